"""The scoring rule on hand-made timelines: the newest prediction at or before ts - ta, never a
later one; segments without a prediction stay in every denominator; sparse (top-k) scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from malmm_ros.data.epic import AnticipationSample, Segment, samples_from_segments
from malmm_ros.errors import DataError
from malmm_ros.evaluation import (
    ScoreRows,
    Timeline,
    load_annotations,
    prediction_at,
    score_segments,
    segment_metrics,
    timeline_from_predictions,
    video_segments,
)
from malmm_ros.labels import LabelMaps
from malmm_ros.metrics import topk_hits
from malmm_ros.pipeline.prediction import ActionScore, ClassScore, Prediction

V, N = 6, 7


def samples(*starts: float, verbs: tuple[int, ...] | None = None,
            participants: tuple[str, ...] | None = None, tau_a: float = 1.0
            ) -> list[AnticipationSample]:
    verbs = verbs or tuple(0 for _ in starts)
    participants = participants or tuple('P01' for _ in starts)
    segments = [Segment(f'P01_01_{i}', p, 'P01_01', start, start + 1.0, verb_class=v,
                        noun_class=v % N)
                for i, (start, v, p) in enumerate(zip(starts, verbs, participants, strict=True))]
    return samples_from_segments(segments, tau_a, 10.0)


def one_hot_rows(verbs: list[int]) -> ScoreRows:
    """Predictions that are sure of verb v, noun v % N and action (v, v % N)."""
    verb = np.zeros((len(verbs), V), np.float32)
    noun = np.zeros((len(verbs), N), np.float32)
    actions = []
    for i, v in enumerate(verbs):
        verb[i, v] = 1.0
        noun[i, v % N] = 1.0
        actions.append({(v, v % N): 1.0})
    return ScoreRows.from_sparse(verb, noun, actions)


def brute_force(times: list[float], query: float) -> int:
    """Reference: scan every prediction, keep the last one not after the query."""
    best = -1
    for i, t in enumerate(times):
        if t <= query + 1e-6:
            best = i
    return best


# --- the rule ----------------------------------------------------------------------------------


def test_newest_prediction_at_or_before_the_query() -> None:
    times = np.array([0.0, 1.0, 2.0, 3.0])
    queries = np.array([-0.5, 0.0, 0.999, 1.0, 1.5, 2.9999, 3.0, 10.0])
    assert prediction_at(times, queries).tolist() == [-1, 0, 0, 1, 1, 2, 3, 3]


@pytest.mark.parametrize('seed', range(5))
def test_rule_matches_a_brute_force_scan_and_never_peeks(seed: int) -> None:
    rng = np.random.default_rng(seed)
    times = np.sort(np.round(rng.uniform(0, 30, size=40), 1))  # rounding makes ties
    queries = rng.uniform(-2, 35, size=200)
    found = prediction_at(times, queries)
    assert found.tolist() == [brute_force(times.tolist(), q) for q in queries]
    used = found >= 0
    assert np.all(times[found[used]] <= queries[used] + 1e-6)  # never a later prediction
    nxt = found[used] + 1
    later = nxt < len(times)
    assert np.all(times[nxt[later]] > queries[used][later] + 1e-6)  # and the newest one


def test_equal_times_take_the_later_row_and_rounding_is_tolerated() -> None:
    assert prediction_at(np.array([1.0, 1.0, 2.0]), np.array([1.5])).tolist() == [1]
    # ts - ta computed in floats: 2.5 - 1.0 may land a hair below the frame's 1.5
    assert prediction_at(np.array([1.5 + 5e-7]), np.array([1.5])).tolist() == [0]
    assert prediction_at(np.array([1.5 + 1e-3]), np.array([1.5])).tolist() == [-1]


def test_bad_timelines_are_refused() -> None:
    with pytest.raises(ValueError, match='ascending; row 2'):
        prediction_at(np.array([0.0, 2.0, 1.0]), np.array([1.0]))
    assert prediction_at(np.array([0.0]), np.array([np.nan])).tolist() == [-1]
    assert prediction_at(np.zeros(0), np.array([5.0])).tolist() == [-1]


# --- segments and metrics ----------------------------------------------------------------------


def test_segments_before_the_first_prediction_are_misses_in_the_denominator() -> None:
    # Predictions start at 3 s (the recording began late); all of them are right.
    chosen = samples(0.5, 2.5, 5.0, 6.0, verbs=(1, 2, 3, 4))
    times = np.array([3.0, 4.0, 5.0])
    rows = one_hot_rows([3, 3, 4])
    scores = score_segments(chosen, times, rows)
    assert scores.source.tolist() == [-1, -1, 1, 2]
    assert scores.observed.tolist() == [False, False, True, True]
    assert scores.counts() == {'segments': 4, 'scored': 2, 'no_observation': 1,
                               'no_prediction': 1}
    np.testing.assert_array_equal(scores.prediction_time_s[2:], [4.0, 5.0])
    assert np.isnan(scores.prediction_time_s[:2]).all()
    metrics = segment_metrics(scores)
    for task in ('verb', 'noun', 'action'):
        overall = metrics['overall'][task]
        assert overall['count'] == 4
        assert overall['top1_accuracy'] == pytest.approx(0.5)  # 2 right of 4, not of 2
        assert overall['mean_top5_recall'] == pytest.approx(0.5)  # classes 1, 2 missed


def test_a_later_prediction_is_never_used() -> None:
    # ts = 2.5, ta = 1: the anticipation point is 1.5 s. The prediction at 1.6 s is right but
    # has seen 0.1 s too much; the one at 1.4 s is wrong and is the one that counts.
    chosen = samples(2.5, verbs=(2,))
    scores = score_segments(chosen, np.array([1.4, 1.6]), one_hot_rows([5, 2]))
    assert scores.source.tolist() == [0]
    assert segment_metrics(scores)['overall']['verb']['top1_accuracy'] == 0.0


def test_anticipation_time_moves_the_point() -> None:
    chosen = samples(4.0, verbs=(2,), tau_a=2.0)  # point at 2.0 s
    scores = score_segments(chosen, np.array([1.0, 2.0, 3.0]), one_hot_rows([0, 2, 4]))
    assert scores.source.tolist() == [1]
    assert segment_metrics(scores)['overall']['verb']['top1_accuracy'] == 1.0


def test_subsets_unseen_and_tail() -> None:
    # Four scored segments; the third one is predicted wrong.
    chosen = samples(2.0, 3.0, 4.0, 5.0, verbs=(0, 1, 2, 3),
                     participants=('P01', 'P02', 'P02', 'P01'))
    scores = score_segments(chosen, np.array([1.0, 2.0, 3.0, 4.0]), one_hot_rows([0, 1, 5, 3]))
    metrics = segment_metrics(scores, unseen_participants={'P02'}, tail_verbs={2},
                              tail_nouns={3})
    assert metrics['overall']['verb']['top1_accuracy'] == pytest.approx(0.75)
    assert metrics['unseen']['verb']['count'] == 2
    assert metrics['unseen']['verb']['top1_accuracy'] == pytest.approx(0.5)
    # Tail: verbs on tail verbs (segment 2, wrong), nouns on tail nouns (segment 3: noun 3,
    # right), actions on either (segments 2 and 3).
    assert metrics['tail']['verb']['count'] == 1
    assert metrics['tail']['verb']['top1_accuracy'] == 0.0
    assert metrics['tail']['noun']['count'] == 1
    assert metrics['tail']['noun']['top1_accuracy'] == 1.0
    assert metrics['tail']['action']['count'] == 2
    assert metrics['tail']['action']['top1_accuracy'] == pytest.approx(0.5)


def test_unlisted_classes_score_zero_and_never_rank_in_the_top_k() -> None:
    verb = np.zeros((1, 12), np.float32)
    verb[0, 5:10] = [0.5, 0.2, 0.1, 0.1, 0.1]  # a top-5 list without class 0
    rows = ScoreRows.from_sparse(verb, np.zeros((1, 3), np.float32), [{}])
    # Class 0 ties with the other zeros; the tie rule would favour low ids, the positive
    # scores still come first.
    assert not topk_hits(rows.verb, np.array([0]), k=5)[0]
    assert topk_hits(rows.verb, np.array([9]), k=5)[0]


def test_an_action_outside_the_columns_is_a_miss_of_its_own_class() -> None:
    chosen = samples(2.0, 3.0, verbs=(1, 2))
    verb = np.eye(V, dtype=np.float32)[[1, 2]]
    noun = np.eye(N, dtype=np.float32)[[1, 2]]
    rows = ScoreRows.from_sparse(verb, noun, [{(1, 1): 0.9}, {(1, 1): 0.9}])  # no (2, 2)
    metrics = segment_metrics(score_segments(chosen, np.array([1.0, 2.0]), rows))
    assert metrics['overall']['verb']['top1_accuracy'] == 1.0
    assert metrics['overall']['action']['top1_accuracy'] == pytest.approx(0.5)
    assert metrics['overall']['action']['classes'] == 2


def test_labels_beyond_the_model_are_refused_naming_the_segment() -> None:
    chosen = samples(2.0, verbs=(V + 3,))
    scores = score_segments(chosen, np.array([1.0]), one_hot_rows([0]))
    with pytest.raises(DataError, match=r"P01_01_0: verb class 9 is beyond the model's 6"):
        segment_metrics(scores)


# --- score rows --------------------------------------------------------------------------------


def test_take_gives_zero_rows_for_missing_predictions() -> None:
    rows = one_hot_rows([1, 2])
    taken = rows.take(np.array([1, -1, 0]))
    assert taken.verb[0, 2] == 1.0 and taken.verb[2, 1] == 1.0
    assert not taken.verb[1].any() and not taken.action[1].any()
    joined = ScoreRows.concatenate([rows, one_hot_rows([4])])
    assert [tuple(p) for p in joined.action_pairs] == [(1, 1), (2, 2), (4, 4)]
    assert joined.action[2].tolist() == [0.0, 0.0, 1.0]


# --- timelines from /malmm/actions ------------------------------------------------------------


def prediction(stamp_ns: int, verbs: list[int], nouns: list[int]) -> dict:
    return Prediction(
        stamp_ns=stamp_ns, frame_id='camera', frames_seen=1, memory_slots=1,
        verbs=tuple(ClassScore(v, f'verb {v}', 0.5 / (i + 1)) for i, v in enumerate(verbs)),
        nouns=tuple(ClassScore(n, f'noun {n}', 0.4 / (i + 1)) for i, n in enumerate(nouns)),
        actions=(ActionScore(verbs[0] * 1000 + nouns[0], verbs[0], nouns[0], 'a', 0.2),),
    ).to_dict()


def test_timeline_from_node_messages() -> None:
    origin = 1_700_000_000_000_000_000
    messages = [prediction(origin + 2_000_000_000, [3, 1], [2]),
                prediction(origin + 1_000_000_000, [0, 4], [6, 5])]  # arrives out of order
    timeline = timeline_from_predictions(messages, LabelMaps.placeholder(V, N),
                                         origin_ns=origin, latency_ms=[30.0, 20.0])
    np.testing.assert_allclose(timeline.times_s, [1.0, 2.0])
    assert timeline.latency_ms.tolist() == [20.0, 30.0]
    assert timeline.rows.verb[0].tolist() == [0.5, 0, 0, 0, 0.25, 0]
    np.testing.assert_allclose(timeline.rows.noun[1], [0, 0, 0.4, 0, 0, 0, 0], rtol=1e-6)
    assert [tuple(p) for p in timeline.rows.action_pairs] == [(0, 6), (3, 2)]
    assert timeline.rows.action.tolist() == [[pytest.approx(0.2), 0.0],
                                             [0.0, pytest.approx(0.2)]]
    moved = timeline.with_times(np.array([5.0, 0.5]))
    assert moved.stamps_ns.tolist() == [origin + 2_000_000_000, origin + 1_000_000_000]
    assert isinstance(moved, Timeline)


def test_foreign_messages_are_refused() -> None:
    labels = LabelMaps.placeholder(V, N)
    good = prediction(5, [1], [1])
    with pytest.raises(DataError, match='schema'):
        timeline_from_predictions([{**good, 'schema': 'other/v9'}], labels, origin_ns=0)
    with pytest.raises(DataError, match='verb id 6 is outside 0..5; was the node running '
                                        'another checkpoint'):
        timeline_from_predictions([prediction(5, [6], [1])], labels, origin_ns=0)
    with pytest.raises(DataError, match='stamp'):
        timeline_from_predictions([{**good, 'stamp': 'now'}], labels, origin_ns=0)


# --- the real validation split -----------------------------------------------------------------

EPIC = Path(__file__).resolve().parents[3] / 'shared' / 'epic100'


@pytest.mark.skipif(not (EPIC / 'EPIC_100_validation.csv').is_file(),
                    reason=f'EK-100 annotations not found in {EPIC}')
def test_all_misses_on_the_real_validation_split() -> None:
    """With no prediction at all every segment stays in the denominators: 9,668 segments,
    1,065 of unseen participants, all metrics zero."""
    context = load_annotations(EPIC / 'EPIC_100_validation.csv', LabelMaps.placeholder())
    assert context.missing == ()
    assert len(context.segments) == 9668
    assert len(video_segments(context, 'P01_11')) > 0
    chosen = samples_from_segments(context.segments)
    scores = score_segments(chosen, np.zeros(0), ScoreRows.empty(97, 300))
    counts = scores.counts()
    assert counts['segments'] == 9668 and counts['scored'] == 0
    assert counts['no_observation'] + counts['no_prediction'] == 9668
    metrics = segment_metrics(scores, tail_verbs=context.tail_verbs,
                              tail_nouns=context.tail_nouns,
                              unseen_participants=context.unseen)
    assert metrics['overall']['action']['count'] == 9668
    assert metrics['overall']['action']['classes'] == 1352  # REFERENCE.md: actions present
    assert metrics['unseen']['verb']['count'] == 1065
    for subset in ('overall', 'unseen', 'tail'):
        for task in ('verb', 'noun', 'action'):
            assert metrics[subset][task]['mean_top5_recall'] == 0.0
