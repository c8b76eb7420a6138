"""The EK-100 action anticipation challenge submission (JSON), from scores per segment.

Format (what epic-kitchens/C3-Action-Anticipation's evaluate_anticipation_json_ek100.py
validates): an object with "version" "0.2", "challenge" "action_anticipation", the Supervision
Levels Scale of the method ("sls_pt", "sls_tl", "sls_td", each 0..5: pre-training, training
labels, training data; arXiv 2008.09890) and "results": {narration_id: {"verb": {class id:
score} for EVERY verb class, "noun": the same for every noun class, "action": {"verb,noun":
score} for exactly the top 100 actions}}.

A segment without a prediction gets zero scores (and zero-score filler actions): the format
needs an entry for every segment, and zero is what the model said about it. Live-mode rows
hold only top-5 lists; the other classes score zero. With fewer than 100 scored actions the
list is filled with zero-score (verb, noun) pairs in id order, up to verbs x nouns.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from malmm_ros.evaluation.scoring import SegmentScores
from malmm_ros.files import atomic_write

__all__ = ['CHALLENGE', 'SUBMISSION_ACTIONS', 'SUBMISSION_VERSION', 'submission',
           'write_submission']

SUBMISSION_VERSION = '0.2'
CHALLENGE = 'action_anticipation'
SUBMISSION_ACTIONS = 100


def _check_level(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 5:
        raise ValueError(f'{name} must be an integer in 0..5 (Supervision Levels Scale), got '
                         f'{value!r}')
    return value


def _score(value: float) -> float:
    # Seven significant digits keep a float32 probability (and its ranking) and halve the file.
    return float(f'{value:.7g}')


def _actions(scores: np.ndarray, pairs: np.ndarray, num_verbs: int, num_nouns: int,
             count: int) -> dict[str, float]:
    order = np.argsort(-scores, kind='stable')[:count]
    chosen = {(int(pairs[j, 0]), int(pairs[j, 1])): _score(scores[j]) for j in order}
    wanted = min(count, num_verbs * num_nouns)
    if len(chosen) < wanted:  # fewer scored columns than the format asks for: zero filler
        for flat in range(num_verbs * num_nouns):
            pair = divmod(flat, num_nouns)
            if pair not in chosen:
                chosen[pair] = 0.0
                if len(chosen) == wanted:
                    break
    return {f'{v},{n}': score for (v, n), score in chosen.items()}


def submission(scores: SegmentScores, *, sls_pt: int, sls_tl: int, sls_td: int,
               actions: int = SUBMISSION_ACTIONS) -> dict[str, Any]:
    """The submission object for every segment of `scores` (see the module docstring)."""
    levels = {name: _check_level(name, value)
              for name, value in (('sls_pt', sls_pt), ('sls_tl', sls_tl), ('sls_td', sls_td))}
    rows = scores.rows
    num_verbs, num_nouns = rows.verb.shape[1], rows.noun.shape[1]
    results: dict[str, Any] = {}
    for i, sample in enumerate(scores.samples):
        results[sample.narration_id] = {
            'verb': {str(c): _score(s) for c, s in enumerate(rows.verb[i].tolist())},
            'noun': {str(c): _score(s) for c, s in enumerate(rows.noun[i].tolist())},
            'action': _actions(rows.action[i], rows.action_pairs, num_verbs, num_nouns,
                               actions),
        }
    return {'version': SUBMISSION_VERSION, 'challenge': CHALLENGE, **levels,
            'results': results}


def write_submission(path: str | os.PathLike, scores: SegmentScores, *, sls_pt: int,
                     sls_tl: int, sls_td: int) -> Path:
    """Write the submission JSON (atomically: a temporary file, then renamed)."""
    path = Path(path)
    data = submission(scores, sls_pt=sls_pt, sls_tl=sls_tl, sls_td=sls_td)
    return atomic_write(path, json.dumps(data, separators=(',', ':'), allow_nan=False))
