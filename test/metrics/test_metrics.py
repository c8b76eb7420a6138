"""Tests for malmm_ros.metrics: hand-computed cases, ties, k > C, subsets and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from malmm_ros.metrics import (
    anticipation_metrics,
    mean_topk_recall,
    per_class_topk_recall,
    tail_action_mask,
    topk_accuracy,
    topk_hits,
    topk_indices,
)

# Four samples, three classes. Ranks of the label under "ties: lower class id first":
#   row 0: label 1 scores 0.7, the best                          -> rank 0
#   row 1: label 2 scores 0.2, below 0.5 and 0.3                 -> rank 2
#   row 2: label 0 ties class 1 at 0.2 and wins it (lower id)    -> rank 1 (class 2 is higher)
#   row 3: label 1 ties class 0 at 0.2 and loses it              -> rank 2
SCORES = np.array(
    [
        [0.1, 0.7, 0.2],
        [0.5, 0.3, 0.2],
        [0.2, 0.2, 0.6],
        [0.2, 0.2, 0.6],
    ]
)
LABELS = np.array([1, 2, 0, 1])


def _reference_topk(row: np.ndarray, k: int) -> list[int]:
    """Independent definition of the tie rule: sort by (-score, class id)."""
    return sorted(range(row.shape[0]), key=lambda c: (-row[c], c))[:k]


# --- hand-computed cases -----------------------------------------------------------------------


def test_topk_indices_hand_case() -> None:
    # Row 2 and 3: class 2 (0.6) first, then the 0.2 tie broken towards class 0.
    expected = [[1, 2], [0, 1], [2, 0], [2, 0]]
    assert topk_indices(SCORES, 2).tolist() == expected
    assert topk_indices(SCORES, 2).dtype == np.int64


def test_topk_accuracy_hand_case() -> None:
    # Ranks are [0, 2, 1, 2]: top-1 hits row 0 only, top-2 rows 0 and 2, top-3 all.
    assert topk_accuracy(SCORES, LABELS, 1) == pytest.approx(1 / 4)
    assert topk_accuracy(SCORES, LABELS, 2) == pytest.approx(2 / 4)
    assert topk_accuracy(SCORES, LABELS, 3) == pytest.approx(1.0)
    assert topk_hits(SCORES, LABELS, 2).tolist() == [True, False, True, False]


def test_k_larger_than_classes_takes_everything() -> None:
    assert topk_accuracy(SCORES, LABELS, 5) == 1.0
    assert topk_indices(SCORES, 5).shape == (4, 3)
    assert mean_topk_recall(SCORES, LABELS, 5) == 1.0


def test_per_class_recall_hand_case() -> None:
    # Top-2: class 0 has row 2 (hit) -> 1; class 1 rows 0 (hit) and 3 (miss) -> 1/2;
    # class 2 row 1 (miss) -> 0. Mean = (1 + 0.5 + 0) / 3 = 0.5.
    assert per_class_topk_recall(SCORES, LABELS, 2) == {0: 1.0, 1: 0.5, 2: 0.0}
    assert mean_topk_recall(SCORES, LABELS, 2) == pytest.approx(0.5)
    # Restricted to classes {1, 2, 9}: 9 is absent from the labels and left out -> (0.5 + 0) / 2.
    assert per_class_topk_recall(SCORES, LABELS, 2, classes={1, 2, 9}) == {1: 0.5, 2: 0.0}
    assert mean_topk_recall(SCORES, LABELS, 2, classes=[1, 2, 9]) == pytest.approx(0.25)


def test_class_mean_differs_from_accuracy_on_imbalanced_data() -> None:
    # Four samples of class 0, one of class 1, and a model that always says class 0:
    # top-1 accuracy = 4/5 = 0.8 but class-mean recall = (1 + 0) / 2 = 0.5.
    scores = np.tile([1.0, 0.0, 0.0], (5, 1))
    labels = np.array([0, 0, 0, 0, 1])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(0.8)
    assert mean_topk_recall(scores, labels, 1) == pytest.approx(0.5)


def test_ties_follow_class_id_order() -> None:
    # A uniform row predicts classes 0..k-1: label 1 is a top-2 hit, label 2 is not.
    uniform = np.full((2, 4), 0.25)
    assert topk_indices(uniform, 2).tolist() == [[0, 1], [0, 1]]
    assert topk_hits(uniform, np.array([1, 2]), 2).tolist() == [True, False]
    # -0.0 and 0.0 are equal scores, so the lower id wins.
    assert topk_indices(np.array([[0.0, -0.0]]), 1).tolist() == [[0]]
    assert topk_indices(np.array([[-0.0, 0.0]]), 1).tolist() == [[0]]


def test_infinite_scores_rank_normally() -> None:
    scores = np.array([[-np.inf, 0.0, np.inf], [-np.inf, -np.inf, -np.inf]])
    assert topk_indices(scores, 3).tolist() == [[2, 1, 0], [0, 1, 2]]
    assert topk_hits(scores, np.array([0, 0]), 2).tolist() == [False, True]


def test_missing_label_is_always_a_miss() -> None:
    # Sample 1's true class has no column: a miss even when k covers every class.
    scores = np.array([[0.5, 0.5], [0.5, 0.5]])
    labels = np.array([0, -1])
    assert topk_accuracy(scores, labels, 5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match='pass class_ids'):
        mean_topk_recall(scores, labels, 5)
    # With class ids each class keeps its own entry: {10: 1, 20: 0} -> 0.5.
    ids = np.array([10, 20])
    assert per_class_topk_recall(scores, labels, 5, class_ids=ids) == {10: 1.0, 20: 0.0}
    assert mean_topk_recall(scores, labels, 5, class_ids=ids) == pytest.approx(0.5)


def test_unobserved_samples_count_as_misses() -> None:
    # A uniform row would hit label 0 through the tie rule; observed=False makes it a miss that
    # stays in the denominator: accuracy 1/2, recall {0: 1/2} -> 0.5 instead of 1.0.
    scores = np.full((2, 3), 1 / 3)
    labels = np.array([0, 0])
    assert topk_accuracy(scores, labels, 1) == 1.0
    observed = np.array([True, False])
    assert topk_accuracy(scores, labels, 1, observed=observed) == pytest.approx(0.5)
    assert mean_topk_recall(scores, labels, 1, observed=observed) == pytest.approx(0.5)


def test_matches_independent_reference_across_chunks() -> None:
    # Small integer scores make ties frequent; 5000 rows cross the 4096-row chunk boundary.
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(5000, 7)).astype(np.float32)
    labels = rng.integers(0, 7, size=5000)
    for k in (1, 3, 7):
        reference = [_reference_topk(row, k) for row in scores]
        assert topk_indices(scores, k).tolist() == reference
        hits = np.array([label in top for label, top in zip(labels, reference, strict=True)])
        assert np.array_equal(topk_hits(scores, labels, k), hits)
        per_class = {c: hits[labels == c].mean() for c in np.unique(labels)}
        assert mean_topk_recall(scores, labels, k) == pytest.approx(
            np.mean(list(per_class.values()))
        )


def test_accepts_torch_tensors() -> None:
    torch = pytest.importorskip('torch')
    scores = torch.tensor(SCORES, requires_grad=True)
    labels = torch.tensor(LABELS)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(0.5)
    assert mean_topk_recall(scores, labels, 2) == pytest.approx(0.5)


def test_integer_scores_are_accepted() -> None:
    scores = np.array([[3, 1, 2]], dtype=np.int32)
    assert topk_indices(scores, 3).tolist() == [[0, 2, 1]]


# --- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ('scores', 'labels', 'k', 'message'),
    [
        (np.zeros(3), np.array([0]), 5, r'2-D \[N, classes\]'),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), 5, r'at least one sample \(N >= 1\)'),
        (np.zeros((2, 0)), np.array([0, 0]), 5, 'at least one class'),
        (np.array([[0.1, np.nan]]), np.array([0]), 5, r'NaN \(first in row 0\)'),
        (np.array([[True, False]]), np.array([0]), 5, 'real numbers, got dtype bool'),
        (np.array([['a', 'b']]), np.array([0]), 5, 'real numbers'),
        (np.zeros((2, 3)), np.array([0.0, 1.0]), 5, 'labels must hold integers'),
        (np.zeros((2, 3)), np.array([[0, 1]]), 5, r'1-D \[N\]'),
        (np.zeros((2, 3)), np.array([0]), 5, 'labels has 1 entries but the scores have 2 rows'),
        (np.zeros((2, 3)), np.array([0, 3]), 5, r'labels\[1\] = 3 is out of range -1..2'),
        (np.zeros((2, 3)), np.array([-2, 0]), 5, r'labels\[0\] = -2 is out of range'),
        (np.zeros((2, 3)), np.array([0, 1]), 0, 'k must be an int >= 1, got 0'),
        (np.zeros((2, 3)), np.array([0, 1]), 1.5, 'k must be an int >= 1'),
        (np.zeros((2, 3)), np.array([0, 1]), True, 'k must be an int >= 1'),
    ],
)
def test_bad_inputs(scores: np.ndarray, labels: np.ndarray, k: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        topk_accuracy(scores, labels, k)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        mean_topk_recall(scores, labels, k)  # type: ignore[arg-type]


def test_bad_observed_class_ids_and_classes() -> None:
    with pytest.raises(ValueError, match='observed must be a boolean'):
        topk_accuracy(SCORES, LABELS, observed=np.array([1, 1, 1, 1]))
    with pytest.raises(ValueError, match='observed must be a boolean'):
        topk_accuracy(SCORES, LABELS, observed=np.array([True]))
    with pytest.raises(ValueError, match='class_ids must be an integer'):
        mean_topk_recall(SCORES, LABELS, class_ids=np.array([1, 2]))
    with pytest.raises(ValueError, match='none of the given classes'):
        mean_topk_recall(SCORES, LABELS, classes=[7])
    with pytest.raises(ValueError, match='at least one class'):
        mean_topk_recall(SCORES, LABELS, classes=[])


# --- anticipation_metrics ----------------------------------------------------------------------

# Four samples; verbs 0..2, nouns 0..1, action columns (0,0), (1,1), (2,0). Sample 3 is (2,1),
# which has no action column (label -1).
VERB_LABELS = np.array([0, 1, 2, 2])
NOUN_LABELS = np.array([0, 1, 0, 1])
ACTION_LABELS = np.array([0, 1, 2, -1])
VERB_SCORES = np.array(
    [
        [0.9, 0.05, 0.05],  # label 0, rank 0
        [0.6, 0.3, 0.1],  # label 1, rank 1
        [0.1, 0.2, 0.7],  # label 2, rank 0
        [0.5, 0.4, 0.1],  # label 2, rank 2
    ]
)
NOUN_SCORES = np.array(
    [
        [0.8, 0.2],  # label 0, rank 0
        [0.7, 0.3],  # label 1, rank 1
        [0.4, 0.6],  # label 0, rank 1
        [0.5, 0.5],  # label 1, tie lost to class 0: rank 1
    ]
)
ACTION_SCORES = np.array(
    [
        [0.1, 0.8, 0.1],  # label 0: below column 1, ties column 2 and wins: rank 1
        [0.2, 0.5, 0.3],  # label 1, rank 0
        [0.6, 0.3, 0.1],  # label 2, rank 2
        [0.3, 0.3, 0.4],  # label -1: always a miss
    ]
)


def _report(**kwargs: object) -> dict:
    return anticipation_metrics(
        VERB_SCORES, NOUN_SCORES, ACTION_SCORES, VERB_LABELS, NOUN_LABELS, ACTION_LABELS,
        k=2, **kwargs,  # type: ignore[arg-type]
    )


def _cell(top1: float, top2: float, recall: float, count: int, classes: int) -> dict:
    return {
        'top1_accuracy': pytest.approx(top1),
        'top2_accuracy': pytest.approx(top2),
        'mean_top2_recall': pytest.approx(recall),
        'count': count,
        'classes': classes,
    }


def test_anticipation_metrics_overall_hand_case() -> None:
    report = _report()
    assert list(report) == ['overall']
    overall = report['overall']
    # Verb top-2 hits [T, T, T, F]; top-1 [T, F, T, F]. Class mean: 0 -> 1, 1 -> 1, 2 -> 1/2.
    assert overall['verb'] == _cell(2 / 4, 3 / 4, (1 + 1 + 0.5) / 3, 4, 3)
    # Nouns: k = 2 = C so every top-2 is a hit; top-1 only sample 0.
    assert overall['noun'] == _cell(1 / 4, 1.0, 1.0, 4, 2)
    # Actions: top-1 [F, T, F, F], top-2 [T, T, F, F]; the four (verb, noun) classes are
    # (0,0) -> 1, (1,1) -> 1, (2,0) -> 0, (2,1) -> 0 (unscored): mean 0.5.
    assert overall['action'] == _cell(1 / 4, 2 / 4, 0.5, 4, 4)


def test_anticipation_metrics_subsets_and_tail() -> None:
    unseen = np.array([False, True, False, True])
    report = _report(subsets={'unseen': unseen}, tail_verbs={2}, tail_nouns=[1])
    assert list(report) == ['overall', 'unseen', 'tail']
    # Unseen = samples 1 and 3. Verb: top-1 none, top-2 sample 1; classes 1 -> 1, 2 -> 0.
    assert report['unseen']['verb'] == _cell(0.0, 0.5, 0.5, 2, 2)
    assert report['unseen']['noun'] == _cell(0.0, 1.0, 1.0, 2, 1)
    # Actions: sample 1 hit at top 1, sample 3 unscored: (1,1) -> 1, (2,1) -> 0.
    assert report['unseen']['action'] == _cell(0.5, 0.5, 0.5, 2, 2)
    # Tail verbs {2}: samples 2, 3. Tail nouns {1}: samples 1, 3. Tail actions (verb 2 or noun
    # 1): samples 1, 2, 3 with top-2 hits [T, F, F] and classes (1,1), (2,0), (2,1).
    assert report['tail']['verb'] == _cell(0.5, 0.5, 0.5, 2, 1)
    assert report['tail']['noun'] == _cell(0.0, 1.0, 1.0, 2, 1)
    assert report['tail']['action'] == _cell(1 / 3, 1 / 3, 1 / 3, 3, 3)
    # An explicit tail action set (official ids): only (2, 0) = 2000, i.e. sample 2, a miss.
    explicit = _report(tail_verbs={2}, tail_nouns={1}, tail_actions={2000})
    assert explicit['tail']['action'] == _cell(0.0, 0.0, 0.0, 1, 1)


def test_anticipation_metrics_unobserved_and_empty_subset() -> None:
    # Sample 3 unobserved: its noun (a top-2 hit) becomes a miss. Noun classes: 0 -> 1 (samples 0
    # and 2), 1 -> 1/2 (sample 1 hit, 3 missed): mean 0.75; accuracy 3/4.
    report = _report(
        observed=np.array([True, True, True, False]), subsets={'none': np.zeros(4, dtype=bool)}
    )
    assert report['overall']['noun'] == _cell(1 / 4, 3 / 4, 0.75, 4, 2)
    assert report['none']['verb'] == {
        'top1_accuracy': None,
        'top2_accuracy': None,
        'mean_top2_recall': None,
        'count': 0,
        'classes': 0,
    }


def test_tail_action_mask_is_verb_or_noun() -> None:
    mask = tail_action_mask(VERB_LABELS, NOUN_LABELS, {2}, {1})
    assert mask.tolist() == [False, True, True, True]


def test_anticipation_metrics_bad_inputs() -> None:
    with pytest.raises(ValueError, match="subset name 'tail' is reserved"):
        _report(subsets={'tail': np.ones(4, dtype=bool)})
    with pytest.raises(ValueError, match=r"subsets\['x'\] must be a boolean"):
        _report(subsets={'x': np.array([0, 1, 2, 3])})
    with pytest.raises(ValueError, match='both tail_verbs and tail_nouns'):
        _report(tail_verbs={1})
    with pytest.raises(ValueError, match='tail_actions needs'):
        _report(tail_actions={1})
    with pytest.raises(ValueError, match='noun_scores has 3 rows but verb_scores has 4'):
        anticipation_metrics(
            VERB_SCORES, NOUN_SCORES[:3], ACTION_SCORES, VERB_LABELS, NOUN_LABELS, ACTION_LABELS
        )
    with pytest.raises(ValueError, match=r'verb_labels\[0\] = -1 is out of range 0..2'):
        anticipation_metrics(
            VERB_SCORES, NOUN_SCORES, ACTION_SCORES, np.array([-1, 1, 2, 2]), NOUN_LABELS,
            ACTION_LABELS,
        )
    # Column 0 for both (0, 0) and (1, 1): the caller's mapping is broken.
    with pytest.raises(ValueError, match=r'action_labels\[1\] = 0 is also used'):
        anticipation_metrics(
            VERB_SCORES, NOUN_SCORES, ACTION_SCORES, VERB_LABELS, NOUN_LABELS,
            np.array([0, 0, 2, -1]),
        )
