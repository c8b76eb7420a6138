"""The challenge submission JSON: the structure the official validator checks
(epic-kitchens/C3-Action-Anticipation, evaluate_anticipation_json_ek100.py), written here as
its own checks, plus the choice of the top-100 actions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from malmm_ros.data.epic import Segment, samples_from_segments
from malmm_ros.evaluation import ScoreRows, score_segments, submission, write_submission
from malmm_ros.evaluation.submission import CHALLENGE, SUBMISSION_VERSION
from malmm_ros.labels import LabelMaps

V, N = 97, 300  # the EK-100 class counts the official validator expects


def scores_for(rows: ScoreRows, starts: list[float]):
    segments = [Segment(f'P01_11_{i}', 'P01', 'P01_11', s, s + 1.0, verb_class=1, noun_class=2)
                for i, s in enumerate(starts)]
    samples = samples_from_segments(segments, 1.0, 10.0)
    return score_segments(samples, np.arange(len(rows), dtype=np.float64) + 1.0, rows)


def check_official_structure(data: dict, narration_ids: list[str], num_verbs: int,
                             num_nouns: int, num_actions: int) -> None:
    """What the official validator requires of every entry."""
    assert data['version'] == SUBMISSION_VERSION == '0.2'
    assert data['challenge'] == CHALLENGE == 'action_anticipation'
    for level in ('sls_pt', 'sls_tl', 'sls_td'):
        assert isinstance(data[level], int) and 0 <= data[level] <= 5
    assert sorted(data['results']) == sorted(narration_ids)
    for entry in data['results'].values():
        for task, count in (('verb', num_verbs), ('noun', num_nouns)):
            assert sorted(int(key) for key in entry[task]) == list(range(count))
            assert all(isinstance(score, float) for score in entry[task].values())
        assert len(entry['action']) == num_actions
        for key, score in entry['action'].items():
            verb, noun = (int(x) for x in key.split(','))
            assert 0 <= verb < num_verbs and 0 <= noun < num_nouns
            assert isinstance(score, float)


def random_rows(count: int, seed: int = 0, with_head: bool = True) -> ScoreRows:
    rng = np.random.default_rng(seed)
    verb = rng.dirichlet(np.ones(V), size=count).astype(np.float32)
    noun = rng.dirichlet(np.ones(N), size=count).astype(np.float32)
    if not with_head:
        return ScoreRows.from_dense(verb, noun, None, LabelMaps.placeholder(V, N))
    pairs = [(v, n) for v in range(0, V, 3) for n in range(0, N, 40)]  # 264 actions
    labels = LabelMaps.placeholder(V, N).with_actions(pairs)
    action = rng.dirichlet(np.ones(len(pairs)), size=count).astype(np.float32)
    return ScoreRows.from_dense(verb, noun, action, labels)


@pytest.mark.parametrize('with_head', [True, False])
def test_structure_and_top_100_actions(with_head: bool) -> None:
    rows = random_rows(3, with_head=with_head)
    scores = scores_for(rows, [2.0, 3.0, 4.0])
    data = submission(scores, sls_pt=1, sls_tl=2, sls_td=3)
    check_official_structure(data, [s.narration_id for s in scores.samples], V, N, 100)
    assert (data['sls_pt'], data['sls_tl'], data['sls_td']) == (1, 2, 3)
    entry = data['results']['P01_11_1']
    np.testing.assert_allclose([entry['verb'][str(c)] for c in range(V)], rows.verb[1],
                               rtol=1e-6)
    # The 100 listed actions are the 100 best of the row.
    row = scores.rows.action[1]
    best = np.sort(row)[::-1][:100]
    np.testing.assert_allclose(sorted(entry['action'].values(), reverse=True), best, rtol=1e-6)
    if not with_head:  # p(verb) x p(noun): the scores are the products
        for key, score in list(entry['action'].items())[:10]:
            v, n = (int(x) for x in key.split(','))
            assert score == pytest.approx(float(rows.verb[1, v]) * float(rows.noun[1, n]),
                                          rel=1e-5)


def test_segments_without_a_prediction_get_zero_scores() -> None:
    rows = random_rows(1)
    scores = scores_for(rows, [0.5, 2.0])  # the first has no observation (ts - ta < 0)
    data = submission(scores, sls_pt=0, sls_tl=0, sls_td=0)
    check_official_structure(data, ['P01_11_0', 'P01_11_1'], V, N, 100)
    missed = data['results']['P01_11_0']
    assert not any(missed['verb'].values()) and not any(missed['noun'].values())
    assert not any(missed['action'].values())


def test_few_scored_actions_are_filled_with_zero_pairs() -> None:
    # Live mode: top-5 lists only, zeros elsewhere; a tiny label space of 5 x 8 pairs.
    verb = np.zeros((1, 5), np.float32)
    verb[0, [3, 1]] = [0.6, 0.3]
    noun = np.zeros((1, 8), np.float32)
    noun[0, 6] = 0.9
    rows = ScoreRows.from_sparse(verb, noun, [{(3, 6): 0.5, (1, 6): 0.2}])
    data = submission(scores_for(rows, [2.0]), sls_pt=0, sls_tl=0, sls_td=0)
    check_official_structure(data, ['P01_11_0'], 5, 8, 40)  # all 40 pairs exist
    actions = data['results']['P01_11_0']['action']
    assert list(actions)[:2] == ['3,6', '1,6']
    assert actions['3,6'] == 0.5 and actions['1,6'] == 0.2
    assert sum(1 for s in actions.values() if s == 0.0) == 38


def test_supervision_levels_are_checked() -> None:
    scores = scores_for(random_rows(1), [2.0])
    with pytest.raises(ValueError, match='sls_tl must be an integer in 0..5'):
        submission(scores, sls_pt=0, sls_tl=6, sls_td=0)


def test_written_file_round_trips(tmp_path: Path) -> None:
    rows = random_rows(2, seed=3)
    scores = scores_for(rows, [2.0, 3.0])
    path = write_submission(tmp_path / 'submission.json', scores, sls_pt=2, sls_tl=3, sls_td=4)
    loaded = json.loads(path.read_text())
    check_official_structure(loaded, ['P01_11_0', 'P01_11_1'], V, N, 100)
    assert loaded == json.loads(json.dumps(submission(scores, sls_pt=2, sls_tl=3, sls_td=4)))
    assert not list(tmp_path.glob('*.tmp'))
