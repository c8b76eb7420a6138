"""Features mode: score a whole split from malmm-extract features, fast and without a bag.

Each segment's observed window [ts - ta - to, ts - ta] is sampled at the checkpoint's
sample_fps and streamed through a fresh memory of its M slots (FeatureWindows + WindowModel,
the training code path with autograd off, so the node's arithmetic). Unlike direct mode, the
memory holds only that window, exactly as in training; segments with no observation
(ts - ta < 0), no feature file or no feature frame in the window are misses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from malmm_ros.data.epic import AnticipationSample
from malmm_ros.data.features import FeatureStore
from malmm_ros.errors import CheckpointError, DataError
from malmm_ros.evaluation.scoring import ScoreRows, SegmentScores
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.training.loop import predict_windows
from malmm_ros.training.streaming import WindowModel
from malmm_ros.training.windows import FeatureWindows

__all__ = ['ProtocolSettings', 'feature_segment_scores', 'protocol_from_checkpoint']


@dataclass(frozen=True)
class ProtocolSettings:
    """How a checkpoint observes: anticipation time, window, sampling rate and memory length."""

    tau_a: float = 1.0
    tau_o: float = 10.0
    sample_fps: float = 1.0
    memory_bank_length: int = 20
    max_feature_lag_s: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def protocol_from_checkpoint(metadata: dict[str, Any], **overrides: Any) -> ProtocolSettings:
    """The protocol a checkpoint was trained with (its training info), then `overrides`
    (None values ignored); fields the checkpoint lacks keep the EK-100 defaults."""
    info = metadata.get('training') or {}
    config = info.get('config') if isinstance(info.get('config'), dict) else {}
    data = config.get('data') if isinstance(config.get('data'), dict) else {}
    values: dict[str, Any] = {}
    for name in ('tau_a', 'tau_o', 'sample_fps', 'memory_bank_length'):
        if name in info:
            values[name] = info[name]
    if 'max_feature_lag_s' in data:
        values['max_feature_lag_s'] = data['max_feature_lag_s']
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        settings = ProtocolSettings(**values)
    except TypeError as exc:
        raise CheckpointError(f'bad protocol settings: {exc}') from None
    for name in ('tau_a', 'tau_o', 'sample_fps', 'max_feature_lag_s'):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(
                value) or value < 0 or (name in ('tau_o', 'sample_fps') and value == 0):
            raise CheckpointError(f'{name} must be a finite number >= 0 (> 0 for tau_o and '
                                  f'sample_fps), got {value!r}')
    if isinstance(settings.memory_bank_length, bool) or not isinstance(
            settings.memory_bank_length, int) or settings.memory_bank_length < 1:
        raise CheckpointError(f'memory_bank_length must be a positive integer, got '
                              f'{settings.memory_bank_length!r}')
    return settings


def feature_segment_scores(store: FeatureStore, samples: Sequence[AnticipationSample],
                           model: MalmmModel, settings: ProtocolSettings, *,
                           batch_size: int = 32, progress: bool = False
                           ) -> tuple[SegmentScores, dict[str, int]]:
    """Scores of every sample from the features in `store`; also the windows' summary
    (windows, no_observation, no_features, feature_gap)."""
    windows = FeatureWindows(store, samples, model.labels, sample_fps=settings.sample_fps,
                             max_lag_s=settings.max_feature_lag_s)
    for video_id in sorted({samples[i].video_id for i in windows.kept}):
        features = store.open(video_id)
        shape = (features.num_tokens, features.feature_dim)
        if shape != (model.num_tokens, model.feature_dim):
            raise DataError(f'{features.path}: {shape[0]} tokens x {shape[1]} features per '
                            f'frame, but the checkpoint expects {model.num_tokens} x '
                            f'{model.feature_dim} (features from another encoder?)')
    labels = model.labels
    if len(windows):
        runner = WindowModel(model, settings.memory_bank_length)
        scores = predict_windows(runner, windows, batch_size=batch_size, progress=progress)
        kept_rows = ScoreRows.from_dense(scores['verb'], scores['noun'], scores.get('action'),
                                         labels)
    else:
        kept_rows = ScoreRows.empty(labels.num_verbs, labels.num_nouns)
    source = np.full(len(samples), -1, dtype=np.int64)
    source[np.asarray(windows.kept, dtype=np.int64)] = np.arange(len(windows.kept))
    observed = source >= 0
    ends = np.array([np.nan if s.observe_end_s is None else s.observe_end_s for s in samples],
                    dtype=np.float64)
    result = SegmentScores(tuple(samples), kept_rows.take(source), observed, source,
                           np.where(observed, ends, np.nan))
    return result, windows.summary()
