"""Observed windows: what one training or evaluation example streams through the memory.

A window is the encoder tokens of the frames a streaming model samples between
ts - ta - to and ts - ta (malmm_ros.data.epic.observation_times), their times, and the labels
of the action that starts at ts. Windows whose frame times are the same relative to their end
are batched together, so one memory with batch B serves them all at shared times.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from malmm_ros.data.epic import observation_times
from malmm_ros.labels import LabelMaps

__all__ = ['FeatureWindows', 'InMemoryWindows', 'WindowBatch', 'WindowSource', 'plan_batches']

IGNORE = -100  # label of a head that has no target for an example (cross_entropy ignore_index)


@dataclass(frozen=True)
class WindowBatch:
    """B windows with the same relative frame times."""

    tokens: torch.Tensor  # (B, K, P, F) float32
    times_s: tuple[float, ...]  # K frame times, seconds, ascending (shared by the batch)
    verb: torch.Tensor  # (B,) int64, IGNORE where unknown
    noun: torch.Tensor  # (B,)
    action: torch.Tensor  # (B,) index into the action vocabulary, IGNORE when outside it
    index: torch.Tensor  # (B,) positions of the windows in their source


class WindowSource:
    """Indexable windows: labels and time patterns up front, tokens loaded per batch."""

    verbs: np.ndarray  # (W,) int64
    nouns: np.ndarray
    actions: np.ndarray
    patterns: list[tuple[float, ...]]  # per window: frame times relative to the window's end

    def __len__(self) -> int:
        return len(self.patterns)

    def load_tokens(self, index: Sequence[int]) -> np.ndarray:
        """Tokens of the given windows, (B, K, P, F) float32 (all of one pattern)."""
        raise NotImplementedError

    def batch(self, index: Sequence[int]) -> WindowBatch:
        index = list(index)
        pattern = self.patterns[index[0]]
        if any(self.patterns[i] != pattern for i in index):
            raise ValueError('a batch must hold windows of one time pattern')
        as_long = torch.as_tensor
        return WindowBatch(
            tokens=torch.from_numpy(np.ascontiguousarray(self.load_tokens(index))),
            # Times relative to the end, shifted to start at 0: the model sees only ages.
            times_s=tuple(t - pattern[0] for t in pattern),
            verb=as_long(self.verbs[index], dtype=torch.long),
            noun=as_long(self.nouns[index], dtype=torch.long),
            action=as_long(self.actions[index], dtype=torch.long),
            index=as_long(index, dtype=torch.long),
        )


def _pattern(times: np.ndarray) -> tuple[float, ...]:
    end = float(times[-1])
    return tuple(round(float(t) - end, 3) for t in times)


def action_targets(labels: LabelMaps, verbs: Iterable[int], nouns: Iterable[int]) -> np.ndarray:
    """Index of each (verb, noun) in the label maps' action vocabulary; IGNORE if absent."""
    column = {(a.verb_id, a.noun_id): i for i, a in enumerate(labels.actions)}
    return np.array([column.get((int(v), int(n)), IGNORE) if v >= 0 and n >= 0 else IGNORE
                     for v, n in zip(verbs, nouns, strict=True)], dtype=np.int64)


class InMemoryWindows(WindowSource):
    """Windows held as arrays (synthetic streams, tests, the memory ablation)."""

    def __init__(self, tokens: Sequence[np.ndarray], times_s: Sequence[np.ndarray],
                 verbs: Sequence[int], nouns: Sequence[int], labels: LabelMaps) -> None:
        if not len(tokens) == len(times_s) == len(verbs) == len(nouns):
            raise ValueError('tokens, times, verbs and nouns must have one entry per window')
        self._tokens = [np.asarray(t, dtype=np.float32) for t in tokens]
        for i, (t, s) in enumerate(zip(self._tokens, times_s, strict=True)):
            if t.ndim != 3 or t.shape[0] != len(s) or len(s) == 0:
                raise ValueError(f'window {i}: tokens {t.shape} do not match {len(s)} times')
        self.patterns = [_pattern(np.asarray(s, dtype=np.float64)) for s in times_s]
        self.verbs = np.asarray(verbs, dtype=np.int64)
        self.nouns = np.asarray(nouns, dtype=np.int64)
        self.actions = action_targets(labels, self.verbs, self.nouns)

    def load_tokens(self, index: Sequence[int]) -> np.ndarray:
        return np.stack([self._tokens[i] for i in index])


class FeatureWindows(WindowSource):
    """Windows of EK-100 anticipation samples read from malmm-extract feature files.

    For each sample, the observation times at `sample_fps` (the node's sampling) are mapped to
    the newest feature frame at or before each time (never a later frame: no peeking). Times
    whose feature frame lags by more than `max_lag_s` are dropped; samples left with no frame,
    with no observation (ts - ta < 0) or whose video has no feature file are listed in
    `skipped` with the reason, and `kept` maps windows back to the samples.
    """

    def __init__(self, store, samples: Sequence, labels: LabelMaps, *, sample_fps: float,
                 max_lag_s: float = 1.0) -> None:
        self.store = store
        self.samples = list(samples)
        self.kept: list[int] = []
        self.skipped: dict[str, list[int]] = {'no_observation': [], 'no_features': [],
                                              'feature_gap': []}
        self._refs: list[tuple[str, np.ndarray]] = []
        self.patterns = []
        available = set(store.video_ids())
        for position, sample in enumerate(self.samples):
            if not sample.observable:
                self.skipped['no_observation'].append(position)
                continue
            if sample.video_id not in available:
                self.skipped['no_features'].append(position)
                continue
            features = store.open(sample.video_id)
            times = observation_times(sample, sample_fps)
            frames = features.indices_at(times)
            lag = times - features.times_s[np.maximum(frames, 0)]
            good = (frames >= 0) & (lag <= max_lag_s + 1e-6)
            if not good.any():
                self.skipped['feature_gap'].append(position)
                continue
            self.kept.append(position)
            self._refs.append((sample.video_id, frames[good]))
            self.patterns.append(_pattern(times[good]))
        self.verbs = np.array([_label(self.samples[i].verb_class) for i in self.kept],
                              dtype=np.int64)
        self.nouns = np.array([_label(self.samples[i].noun_class) for i in self.kept],
                              dtype=np.int64)
        self.actions = action_targets(labels, self.verbs, self.nouns)

    def load_tokens(self, index: Sequence[int]) -> np.ndarray:
        out = []
        for i in index:
            video_id, frames = self._refs[i]
            out.append(self.store.open(video_id).tokens(frames))
        return np.stack(out).astype(np.float32, copy=False)

    def summary(self) -> dict[str, int]:
        return {'windows': len(self.kept), **{k: len(v) for k, v in self.skipped.items()}}


def _label(value: int | None) -> int:
    return IGNORE if value is None else int(value)


def plan_batches(source: WindowSource, batch_size: int, *, shuffle: bool, seed: int = 0,
                 rank: int = 0, world: int = 1) -> list[list[int]]:
    """Batches of one time pattern each, shuffled per seed; rank `rank` of `world` gets an equal
    share (a few batches are left out so every rank runs the same number of steps)."""
    by_pattern: dict[tuple[float, ...], list[int]] = {}
    for i, pattern in enumerate(source.patterns):
        by_pattern.setdefault(pattern, []).append(i)
    rng = np.random.default_rng(seed)
    batches = []
    for pattern in sorted(by_pattern, key=lambda p: (len(p), p)):
        members = np.array(by_pattern[pattern])
        if shuffle:
            rng.shuffle(members)
        batches.extend(members[i:i + batch_size].tolist()
                       for i in range(0, len(members), batch_size))
    if shuffle:
        order = rng.permutation(len(batches))
        batches = [batches[i] for i in order]
    if world > 1:
        usable = len(batches) // world * world
        batches = batches[rank:usable:world]
    return batches


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """1/sqrt(frequency) per class, normalised so the average example weight is 1."""
    counts = Counter(int(x) for x in labels if x >= 0)
    weights = torch.ones(num_classes, dtype=torch.float32)
    for c, n in counts.items():
        weights[c] = 1.0 / math.sqrt(n)
    total = sum(counts.values())
    if total:
        mean = sum(n * float(weights[c]) for c, n in counts.items()) / total
        weights /= mean
    return weights
