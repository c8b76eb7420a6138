"""Top-k accuracy and class-mean top-k recall for EK-100 action anticipation (numpy only).

Conventions shared by every function here:

- ``scores`` is a real [N, C] array (numpy, or anything ``np.asarray`` takes, e.g. a CPU torch
  tensor); NaN is refused, +-inf is allowed. ``labels`` is an integer [N] array of columns.
- Ties: classes with equal scores rank by class id, lower id first (a stable sort of the negated
  scores). A row of equal scores therefore predicts classes 0, 1, ..., k - 1.
- ``k`` larger than C is allowed: every class is then in the top k.
- A label of -1 (:data:`MISSING_LABEL`) means the true class has no score column (an action absent
  from the model's action vocabulary): that sample is always a miss. Class-mean recall needs
  ``class_ids`` then, so that each unscored class keeps its own entry in the mean.
- ``observed`` (bool [N], optional): samples marked False count as misses whatever their scores.
  This is how segments that cannot be observed (``ts - tau_a < 0``) stay in every denominator, as
  the protocol asks; do not pass a uniform score row for them instead, since the tie rule would
  turn it into a prediction of classes 0..k-1.
- Class-mean top-k recall: for each class present in the ground truth, the fraction of its samples
  whose label is in the top k; averaged over those classes (the EK-100 anticipation metric).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from malmm_ros.labels import action_ids

__all__ = [
    'MISSING_LABEL',
    'anticipation_metrics',
    'mean_topk_recall',
    'per_class_topk_recall',
    'tail_action_mask',
    'topk_accuracy',
    'topk_hits',
    'topk_indices',
]

MISSING_LABEL = -1

# Rows per chunk when ranking labels: bounds the [rows, C] temporaries (3,806 actions x 4,096 rows
# is about 15 MB of booleans) whatever N is.
_CHUNK_ROWS = 4096


# --- input checks ------------------------------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
    """np.asarray that also takes torch tensors needing grad or living on a GPU."""
    if hasattr(value, 'detach') and hasattr(value, 'cpu'):
        value = value.detach().cpu()
    return np.asarray(value)


def _check_scores(scores: Any, name: str = 'scores') -> np.ndarray:
    array = _to_numpy(scores)
    if array.ndim != 2:
        raise ValueError(f'{name} must be a 2-D [N, classes] array, got shape {array.shape}')
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise ValueError(f'{name} must hold real numbers, got dtype {array.dtype}')
    if array.shape[0] < 1:
        raise ValueError(f'{name} must hold at least one sample (N >= 1), got shape {array.shape}')
    if array.shape[1] < 1:
        raise ValueError(f'{name} must hold at least one class, got shape {array.shape}')
    array = array.astype(np.float64, copy=False)
    if np.isnan(array).any():
        row = int(np.argwhere(np.isnan(array))[0, 0])
        raise ValueError(f'{name} contains NaN (first in row {row})')
    return array


def _check_labels(
    labels: Any, count: int, num_classes: int, name: str = 'labels', *, allow_missing: bool = True
) -> np.ndarray:
    array = _to_numpy(labels)
    if array.ndim != 1:
        raise ValueError(f'{name} must be a 1-D [N] array, got shape {array.shape}')
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f'{name} must hold integers, got dtype {array.dtype}')
    if array.shape[0] != count:
        raise ValueError(f'{name} has {array.shape[0]} entries but the scores have {count} rows')
    array = array.astype(np.int64, copy=False)
    low = MISSING_LABEL if allow_missing else 0
    bad = (array < low) | (array >= num_classes)
    if bad.any():
        index = int(np.argmax(bad))
        allowed = f'-1..{num_classes - 1}' if allow_missing else f'0..{num_classes - 1}'
        raise ValueError(
            f'{name}[{index}] = {array[index]} is out of range {allowed} '
            f'(scores have {num_classes} classes)'
        )
    return array


def _check_mask(mask: Any, count: int, name: str) -> np.ndarray:
    array = _to_numpy(mask)
    if array.dtype != np.bool_ or array.shape != (count,):
        raise ValueError(
            f'{name} must be a boolean [N] mask with N = {count}, got dtype {array.dtype} and '
            f'shape {array.shape}'
        )
    return array


def _check_k(k: Any) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f'k must be an int >= 1, got {k!r}')
    return int(k)


def _class_set(classes: Iterable[int] | None, name: str = 'classes') -> np.ndarray | None:
    if classes is None:
        return None
    array = np.asarray(sorted({int(c) for c in classes}), dtype=np.int64)
    if array.size == 0:
        raise ValueError(f'{name} must name at least one class, got an empty collection')
    return array


# --- ranking -----------------------------------------------------------------------------------


def topk_indices(scores: Any, k: int) -> np.ndarray:
    """Int64 [N, min(k, C)]: the k best classes of each row, best first; ties by lower id."""
    array = _check_scores(scores)
    k = _check_k(k)
    # A stable sort of the negated scores keeps equal scores in class-id order.
    return np.argsort(-array, axis=1, kind='stable')[:, :k].astype(np.int64, copy=False)


def _label_ranks(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each row's label under the tie rule; C for a missing (-1) label.

    rank = (# classes scoring higher) + (# classes with an equal score and a lower id), which is
    the label's position in :func:`topk_indices` without sorting whole rows.
    """
    count, num_classes = scores.shape
    ranks = np.full(count, num_classes, dtype=np.int64)
    class_ids = np.arange(num_classes)
    for begin in range(0, count, _CHUNK_ROWS):
        rows = slice(begin, begin + _CHUNK_ROWS)
        chunk, chunk_labels = scores[rows], labels[rows]
        present = chunk_labels >= 0
        true_scores = chunk[np.arange(chunk.shape[0]), np.where(present, chunk_labels, 0)]
        higher = (chunk > true_scores[:, None]).sum(axis=1)
        tied_before = ((chunk == true_scores[:, None]) & (class_ids < chunk_labels[:, None])).sum(
            axis=1
        )
        ranks[rows] = np.where(present, higher + tied_before, num_classes)
    return ranks


def _hits(
    scores: np.ndarray, labels: np.ndarray, k: int, observed: np.ndarray | None
) -> np.ndarray:
    """Top-k hits of checked inputs (see :func:`topk_hits`)."""
    hits = (_label_ranks(scores, labels) < k) & (labels >= 0)
    return hits if observed is None else hits & observed


def _checked(
    scores: Any, labels: Any, k: Any, observed: Any
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """Validate the common arguments once."""
    array = _check_scores(scores)
    label_array = _check_labels(labels, array.shape[0], array.shape[1])
    mask = None if observed is None else _check_mask(observed, array.shape[0], 'observed')
    return array, label_array, _check_k(k), mask


def topk_hits(scores: Any, labels: Any, k: int = 5, *, observed: Any = None) -> np.ndarray:
    """Bool [N]: whether each sample's label is among its k best classes.

    False for a -1 label and for samples with ``observed`` False.
    """
    return _hits(*_checked(scores, labels, k, observed))


# --- metrics -----------------------------------------------------------------------------------


def topk_accuracy(scores: Any, labels: Any, k: int = 5, *, observed: Any = None) -> float:
    """Fraction of samples whose label is among their k best classes (in [0, 1])."""
    return float(topk_hits(scores, labels, k, observed=observed).mean())


def _per_class(
    hits: np.ndarray, class_ids: np.ndarray, classes: np.ndarray | None
) -> dict[int, float]:
    """Mean of ``hits`` per distinct class id, restricted to ``classes`` when given."""
    unique, inverse = np.unique(class_ids, return_inverse=True)
    recalls = np.bincount(inverse, weights=hits) / np.bincount(inverse)
    keep = np.ones(unique.shape, dtype=bool) if classes is None else np.isin(unique, classes)
    return {int(c): float(r) for c, r in zip(unique[keep], recalls[keep], strict=True)}


def _grouping(labels: np.ndarray, class_ids: Any) -> np.ndarray:
    """The class each sample counts under in class means: ``class_ids`` or else the labels."""
    if class_ids is None:
        if (labels < 0).any():
            raise ValueError(
                'labels contain -1 (true class has no score column): pass class_ids, e.g. the '
                'official action ids, so each such class keeps its own entry in the class mean'
            )
        return labels
    ids = _to_numpy(class_ids)
    if ids.ndim != 1 or ids.shape[0] != labels.shape[0] or not np.issubdtype(
        ids.dtype, np.integer
    ) or ids.dtype == np.bool_:
        raise ValueError(
            f'class_ids must be an integer [N] array with N = {labels.shape[0]}, got dtype '
            f'{ids.dtype} and shape {ids.shape}'
        )
    return ids.astype(np.int64, copy=False)


def per_class_topk_recall(
    scores: Any,
    labels: Any,
    k: int = 5,
    classes: Iterable[int] | None = None,
    *,
    class_ids: Any = None,
    observed: Any = None,
) -> dict[int, float]:
    """Per-class top-k recall {class: fraction of its samples hit}, sorted by class.

    Classes are those present in the ground truth (``class_ids``, default ``labels``), restricted
    to ``classes`` when given (classes of that set absent from the ground truth are left out).
    """
    array, label_array, k, mask = _checked(scores, labels, k, observed)
    grouping = _grouping(label_array, class_ids)
    return _per_class(_hits(array, label_array, k, mask), grouping, _class_set(classes))


def mean_topk_recall(
    scores: Any,
    labels: Any,
    k: int = 5,
    classes: Iterable[int] | None = None,
    *,
    class_ids: Any = None,
    observed: Any = None,
) -> float:
    """Class-mean top-k recall (in [0, 1]): the mean of :func:`per_class_topk_recall`.

    ValueError when ``classes`` leaves no class present in the ground truth.
    """
    recalls = per_class_topk_recall(
        scores, labels, k, classes, class_ids=class_ids, observed=observed
    )
    if not recalls:
        raise ValueError('none of the given classes is present in the labels')
    return float(np.mean(list(recalls.values())))


# --- EK-100 report -----------------------------------------------------------------------------


def tail_action_mask(
    verb_labels: Any, noun_labels: Any, tail_verbs: Iterable[int], tail_nouns: Iterable[int]
) -> np.ndarray:
    """Bool [N]: samples of the EK-100 tail action subset (tail verb OR tail noun).

    This is the official rule: epic-kitchens/C3-Action-Anticipation
    evaluate_anticipation_json_ek100.py (compute_anticipation_metrics) sets
    ``tail_action_bool_idx = tail_verb_bool_idx | tail_noun_bool_idx``; C1-Action-Recognition's
    utils/metrics.py does the same.
    """
    verbs, nouns = _to_numpy(verb_labels), _to_numpy(noun_labels)
    if verbs.shape != nouns.shape or verbs.ndim != 1:
        raise ValueError(
            f'verb_labels and noun_labels must be [N] arrays of one length, got shapes '
            f'{verbs.shape} and {nouns.shape}'
        )
    verb_set, noun_set = _class_set(tail_verbs, 'tail_verbs'), _class_set(tail_nouns, 'tail_nouns')
    return np.isin(verbs, verb_set) | np.isin(nouns, noun_set)


def _summary(
    hits_1: np.ndarray, hits_k: np.ndarray, class_ids: np.ndarray, mask: np.ndarray, k: int
) -> dict[str, float | int | None]:
    """The four numbers of one (subset, task) cell; None values for an empty subset."""
    count = int(mask.sum())
    names = ('top1_accuracy', f'top{k}_accuracy', f'mean_top{k}_recall')
    if count == 0:
        return {**dict.fromkeys(names), 'count': 0, 'classes': 0}
    per_class = _per_class(hits_k[mask], class_ids[mask], None)
    values = (
        float(hits_1[mask].mean()),
        float(hits_k[mask].mean()),
        float(np.mean(list(per_class.values()))),
    )
    return {**dict(zip(names, values, strict=True)), 'count': count, 'classes': len(per_class)}


def anticipation_metrics(
    verb_scores: Any,
    noun_scores: Any,
    action_scores: Any,
    verb_labels: Any,
    noun_labels: Any,
    action_labels: Any,
    *,
    subsets: Mapping[str, Any] | None = None,
    tail_verbs: Iterable[int] | None = None,
    tail_nouns: Iterable[int] | None = None,
    tail_actions: Iterable[int] | None = None,
    observed: Any = None,
    k: int = 5,
) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """EK-100 anticipation report: {subset: {'verb'|'noun'|'action': metrics}}.

    Each metrics dict holds 'top1_accuracy', f'top{k}_accuracy', f'mean_top{k}_recall' (floats in
    [0, 1], None for an empty subset), 'count' (samples) and 'classes' (classes present).

    Subsets: 'overall'; one per boolean [N] mask in ``subsets`` (e.g. {'unseen': mask}); and
    'tail' when tail_verbs and tail_nouns are given, following the official evaluation: verbs are
    scored on tail-verb samples, nouns on tail-noun samples and actions on samples with a tail verb
    or a tail noun (:func:`tail_action_mask`), or, when ``tail_actions`` (official action ids
    verb * 1000 + noun) is given, on samples whose action is in it.

    ``action_labels`` are columns of ``action_scores``; -1 marks an action the model does not
    score: always a miss, yet counted. Action classes for the class mean are the (verb, noun)
    pairs, so every unscored action is a class of its own, as in the official evaluation.
    ``observed`` (bool [N]) marks samples with an observation; the others count as misses.
    """
    k = _check_k(k)
    scores = {
        'verb': _check_scores(verb_scores, 'verb_scores'),
        'noun': _check_scores(noun_scores, 'noun_scores'),
        'action': _check_scores(action_scores, 'action_scores'),
    }
    count = scores['verb'].shape[0]
    for task, array in scores.items():
        if array.shape[0] != count:
            raise ValueError(
                f'{task}_scores has {array.shape[0]} rows but verb_scores has {count}'
            )
    verbs = _check_labels(verb_labels, count, scores['verb'].shape[1], 'verb_labels',
                          allow_missing=False)
    nouns = _check_labels(noun_labels, count, scores['noun'].shape[1], 'noun_labels',
                          allow_missing=False)
    actions = _check_labels(action_labels, count, scores['action'].shape[1], 'action_labels')
    observed_mask = None if observed is None else _check_mask(observed, count, 'observed')

    pair_ids = _action_pair_ids(verbs, nouns, actions, scores['noun'].shape[1])
    labels = {'verb': verbs, 'noun': nouns, 'action': actions}
    class_ids = {'verb': verbs, 'noun': nouns, 'action': pair_ids}
    hits = {
        task: (
            _hits(scores[task], labels[task], 1, observed_mask),
            _hits(scores[task], labels[task], k, observed_mask),
        )
        for task in scores
    }

    masks = _subset_masks(verbs, nouns, subsets, tail_verbs, tail_nouns, tail_actions)
    return {
        subset: {
            task: _summary(*hits[task], class_ids[task], task_masks[task], k)
            for task in scores
        }
        for subset, task_masks in masks.items()
    }


def _action_pair_ids(verbs: np.ndarray, nouns: np.ndarray, actions: np.ndarray,
                     num_nouns: int) -> np.ndarray:
    """The class of each action sample: its (verb, noun) pair packed into one integer.

    ValueError when one action column stands for two different pairs.
    """
    pair_ids = verbs * num_nouns + nouns
    scored = actions >= 0
    columns, first = np.unique(actions[scored], return_index=True)
    expected = pair_ids[scored][first]
    clash = np.flatnonzero(pair_ids[scored] != expected[np.searchsorted(columns, actions[scored])])
    if clash.size:
        index = int(np.flatnonzero(scored)[clash[0]])
        raise ValueError(
            f'action_labels[{index}] = {actions[index]} is also used for another (verb, noun) '
            f'pair; one action column must stand for one (verb, noun) pair'
        )
    return pair_ids


def _subset_masks(verbs: np.ndarray, nouns: np.ndarray, subsets: Mapping[str, Any] | None,
                  tail_verbs: Iterable[int] | None, tail_nouns: Iterable[int] | None,
                  tail_actions: Iterable[int] | None) -> dict[str, dict[str, np.ndarray]]:
    """{subset: {task: bool [N]}}: overall, the given subsets and the official tail subsets."""
    count = len(verbs)
    tasks = ('verb', 'noun', 'action')
    masks = {'overall': dict.fromkeys(tasks, np.ones(count, dtype=bool))}
    for name, mask in (subsets or {}).items():
        if name in ('overall', 'tail'):
            raise ValueError(f"subset name '{name}' is reserved")
        masks[name] = dict.fromkeys(tasks, _check_mask(mask, count, f"subsets['{name}']"))
    if (tail_verbs is None) != (tail_nouns is None):
        raise ValueError('pass both tail_verbs and tail_nouns, or neither')
    if tail_verbs is None or tail_nouns is None:
        if tail_actions is not None:
            raise ValueError('tail_actions needs tail_verbs and tail_nouns as well')
        return masks
    verb_set = _class_set(tail_verbs, 'tail_verbs')
    noun_set = _class_set(tail_nouns, 'tail_nouns')
    if tail_actions is None:
        action_mask = tail_action_mask(verbs, nouns, verb_set, noun_set)
    else:
        action_mask = np.isin(action_ids(verbs, nouns), _class_set(tail_actions, 'tail_actions'))
    masks['tail'] = {'verb': np.isin(verbs, verb_set), 'noun': np.isin(nouns, noun_set),
                     'action': action_mask}
    return masks
