"""Scores per segment: which prediction answers each segment, and the EK-100 metrics of them.

The rule (the EK-100 anticipation protocol applied to a stream): the action starting at ts is
answered by the newest prediction whose video time is at or before ts - ta; never a later one,
which would have seen frames after the anticipation point. A segment with no such prediction
(ts - ta before the video start, or before the first prediction) is a miss that stays in every
denominator (`observed` False).

Probabilities are held as `ScoreRows`: dense verb and noun scores and action scores over listed
(verb, noun) columns, zero where a prediction gave no score (the top-5 lists of the node, the
top pairs of p(verb) * p(noun)). With the metrics' tie rule a zero never outranks a positive
score, so a class a prediction did not list is never in its top k.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from malmm_ros.data.epic import AnticipationSample, action_label_indices
from malmm_ros.data.features import TIME_TOLERANCE_S
from malmm_ros.errors import DataError
from malmm_ros.labels import LabelMaps, top_pairs
from malmm_ros.metrics import anticipation_metrics

__all__ = ['TOP_PAIRS', 'ScoreRows', 'SegmentScores', 'prediction_at', 'score_segments',
           'segment_metrics']

# Pairs kept per prediction when actions are scored as p(verb) * p(noun): what the challenge
# submission asks for (its top-100 actions), and far more than top-5 metrics read.
TOP_PAIRS = 100


@dataclass(frozen=True)
class ScoreRows:
    """Probabilities of R predictions (float32): verb [R, V], noun [R, N], action [R, A].

    Action column j stands for the pair ``action_pairs[j]`` = (verb, noun).
    """

    verb: np.ndarray
    noun: np.ndarray
    action: np.ndarray
    action_pairs: np.ndarray  # (A, 2) int64

    def __post_init__(self) -> None:
        rows = {self.verb.shape[0], self.noun.shape[0], self.action.shape[0]}
        if len(rows) != 1 or self.verb.ndim != 2 or self.noun.ndim != 2 or self.action.ndim != 2:
            raise ValueError(f'score rows disagree: verb {self.verb.shape}, noun '
                             f'{self.noun.shape}, action {self.action.shape}')
        if self.action_pairs.shape != (self.action.shape[1], 2):
            raise ValueError(f'action_pairs {self.action_pairs.shape} do not match '
                             f'{self.action.shape[1]} action columns')

    def __len__(self) -> int:
        return int(self.verb.shape[0])

    @classmethod
    def empty(cls, num_verbs: int, num_nouns: int,
              action_pairs: np.ndarray | Sequence[tuple[int, int]] = ()) -> ScoreRows:
        pairs = np.asarray(action_pairs, dtype=np.int64).reshape(-1, 2)
        return cls(np.zeros((0, num_verbs), np.float32), np.zeros((0, num_nouns), np.float32),
                   np.zeros((0, len(pairs)), np.float32), pairs)

    @classmethod
    def from_dense(cls, verb: np.ndarray, noun: np.ndarray, action: np.ndarray | None,
                   labels: LabelMaps) -> ScoreRows:
        """Rows of full softmax outputs; with `action` None the actions are p(verb) * p(noun),
        its TOP_PAIRS best pairs per row."""
        verb = np.asarray(verb, dtype=np.float32).reshape(len(verb), -1)
        noun = np.asarray(noun, dtype=np.float32).reshape(len(noun), -1)
        if action is not None:
            pairs = np.array([(a.verb_id, a.noun_id) for a in labels.actions],
                             dtype=np.int64).reshape(-1, 2)
            return cls(verb, noun, np.asarray(action, dtype=np.float32), pairs)
        return cls.from_sparse(verb, noun, [
            {(v_id, n_id): score for v_id, n_id, score in top_pairs(v, n, TOP_PAIRS)}
            for v, n in zip(verb, noun, strict=True)])

    @classmethod
    def from_sparse(cls, verb: np.ndarray, noun: np.ndarray,
                    actions: Sequence[Mapping[tuple[int, int], float]]) -> ScoreRows:
        """Dense verbs and nouns; actions given per row as {(verb, noun): score}, zero elsewhere.

        The action columns are the pairs any row scores, sorted (official id order).
        """
        pairs = sorted({pair for row in actions for pair in row})
        column = {pair: j for j, pair in enumerate(pairs)}
        dense = np.zeros((len(actions), len(pairs)), dtype=np.float32)
        for i, row in enumerate(actions):
            for pair, score in row.items():
                dense[i, column[pair]] = score
        return cls(np.asarray(verb, np.float32), np.asarray(noun, np.float32), dense,
                   np.asarray(pairs, dtype=np.int64).reshape(-1, 2))

    def take(self, index: np.ndarray) -> ScoreRows:
        """Rows `index` in order; an index of -1 gives a row of zeros."""
        index = np.asarray(index, dtype=np.int64)
        picked = np.maximum(index, 0)
        missing = (index < 0)[:, None]

        def rows(array: np.ndarray) -> np.ndarray:
            if array.shape[0] == 0:
                return np.zeros((len(index), array.shape[1]), np.float32)
            return np.where(missing, np.float32(0), array[picked])

        return ScoreRows(rows(self.verb), rows(self.noun), rows(self.action), self.action_pairs)

    @staticmethod
    def concatenate(parts: Sequence[ScoreRows]) -> ScoreRows:
        """Rows of several score tables, actions over the union of their columns."""
        if not parts:
            raise ValueError('nothing to concatenate')
        pairs = sorted({(int(v), int(n)) for part in parts for v, n in part.action_pairs})
        column = {pair: j for j, pair in enumerate(pairs)}
        actions = []
        for part in parts:
            block = np.zeros((len(part), len(pairs)), np.float32)
            where = [column[(int(v), int(n))] for v, n in part.action_pairs]
            block[:, where] = part.action
            actions.append(block)
        return ScoreRows(np.concatenate([p.verb for p in parts]),
                         np.concatenate([p.noun for p in parts]), np.concatenate(actions),
                         np.asarray(pairs, dtype=np.int64).reshape(-1, 2))


def prediction_at(times_s: np.ndarray, query_s: np.ndarray) -> np.ndarray:
    """For each query time, the index of the newest prediction at or before it; -1 for none.

    `times_s` must be ascending (equal times allowed: the later row wins). A prediction within
    TIME_TOLERANCE_S after the query still counts as at it (float rounding of ts - ta), never
    one later than that. NaN queries (no anticipation point) get -1.
    """
    times = np.asarray(times_s, dtype=np.float64)
    query = np.asarray(query_s, dtype=np.float64)
    if times.ndim != 1 or query.ndim != 1:
        raise ValueError(f'times_s and query_s must be 1-D, got {times.shape} and {query.shape}')
    if np.isnan(times).any():
        raise ValueError('prediction times contain NaN')
    if times.size > 1 and np.any(np.diff(times) < 0):
        bad = int(np.argmax(np.diff(times) < 0)) + 1
        raise ValueError(f'prediction times must be ascending; row {bad} at {times[bad]:.6f} s '
                         f'comes after {times[bad - 1]:.6f} s')
    found = np.searchsorted(times, query + TIME_TOLERANCE_S, side='right') - 1
    found[np.isnan(query)] = -1
    return found.astype(np.int64)


@dataclass(frozen=True)
class SegmentScores:
    """One score row per segment, with which prediction it came from.

    `observed[i]` is False for a segment without a prediction (a miss in every metric);
    `source[i]` is the row of the answering prediction in its timeline (-1 for none) and
    `prediction_time_s[i]` its video time (NaN for none).
    """

    samples: tuple[AnticipationSample, ...]
    rows: ScoreRows
    observed: np.ndarray  # (S,) bool
    source: np.ndarray  # (S,) int64
    prediction_time_s: np.ndarray  # (S,) float64

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labelled(self) -> bool:
        """True when every segment has verb and noun classes (not test timestamps)."""
        return all(s.verb_class is not None and s.noun_class is not None for s in self.samples)

    def counts(self) -> dict[str, int]:
        """Segments in all, scored, and missed for want of an observation or a prediction."""
        observable = np.array([s.observable for s in self.samples], dtype=bool)
        return {
            'segments': len(self.samples),
            'scored': int(self.observed.sum()),
            'no_observation': int((~observable).sum()),
            'no_prediction': int((observable & ~self.observed).sum()),
        }


def score_segments(samples: Iterable[AnticipationSample], times_s: np.ndarray,
                   rows: ScoreRows) -> SegmentScores:
    """Answer each sample with the newest prediction at or before its ts - ta (module doc)."""
    samples = tuple(samples)
    times = np.asarray(times_s, dtype=np.float64)
    if times.shape != (len(rows),):
        raise ValueError(f'{times.shape[0] if times.ndim else times} prediction times for '
                         f'{len(rows)} score rows')
    query = np.array([np.nan if s.observe_end_s is None else s.observe_end_s for s in samples],
                     dtype=np.float64)
    source = prediction_at(times, query)
    observed = source >= 0
    when = np.where(observed, times[np.maximum(source, 0)] if times.size else np.nan, np.nan)
    return SegmentScores(samples, rows.take(source), observed, source, when)


def segment_metrics(
    scores: SegmentScores,
    *,
    tail_verbs: Iterable[int] | None = None,
    tail_nouns: Iterable[int] | None = None,
    unseen_participants: Iterable[str] | None = None,
    k: int = 5,
) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Top-1 / top-k accuracy and class-mean top-k recall for verb, noun and action: overall,
    for unseen participants (when given) and for the tail classes (when both sets are given).

    Segments without a prediction count as misses. Actions absent from the action columns
    (not in the model's vocabulary) are misses too, each still a class of its own.
    """
    if not scores.labelled:
        raise DataError('the segments have no verb/noun classes (test timestamps?): there is '
                        'nothing to score them against')
    if not len(scores):
        raise DataError('no segments to score')
    rows = scores.rows
    verbs = np.array([s.verb_class for s in scores.samples], dtype=np.int64)
    nouns = np.array([s.noun_class for s in scores.samples], dtype=np.int64)
    for kind, labels, width in (('verb', verbs, rows.verb.shape[1]),
                                ('noun', nouns, rows.noun.shape[1])):
        if labels.max() >= width:
            bad = int(np.argmax(labels >= width))
            raise DataError(f'segment {scores.samples[bad].narration_id}: {kind} class '
                            f'{labels[bad]} is beyond the model\'s {width} {kind} classes')
    actions = action_label_indices(scores.samples, [tuple(p) for p in rows.action_pairs])
    action_scores = rows.action
    if action_scores.shape[1] == 0:  # no action scored at all: one zero column keeps shapes
        action_scores = np.zeros((len(scores), 1), np.float32)
    subsets = {}
    if unseen_participants is not None:
        unseen = frozenset(unseen_participants)
        subsets['unseen'] = np.array([s.participant_id in unseen for s in scores.samples])
    tails = {}
    verb_set = frozenset(tail_verbs) if tail_verbs is not None else frozenset()
    noun_set = frozenset(tail_nouns) if tail_nouns is not None else frozenset()
    if verb_set and noun_set:  # both files present and non-empty
        tails = {'tail_verbs': verb_set, 'tail_nouns': noun_set}
    return anticipation_metrics(rows.verb, rows.noun, action_scores, verbs, nouns, actions,
                                subsets=subsets, observed=scores.observed, k=k, **tails)
