"""Features mode: score a whole split from malmm-extract features, fast and without a bag.

Each segment's observed window [ts - ta - to, ts - ta] is sampled at the checkpoint's
sample_fps and streamed through a fresh memory of its M slots (FeatureWindows + WindowModel,
the training code path with autograd off, so the node's arithmetic). Unlike direct mode, the
memory holds only that window, exactly as in training; segments with no observation
(ts - ta < 0), no feature file or no feature frame in the window are misses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from malmm_ros.data.epic import AnticipationSample
from malmm_ros.data.features import FeatureStore
from malmm_ros.errors import DataError
from malmm_ros.evaluation.scoring import ScoreRows, SegmentScores
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.model.memory import MemorySpec
from malmm_ros.protocol import Protocol
from malmm_ros.training.streaming import WindowModel, predict_windows
from malmm_ros.training.windows import FeatureWindows

__all__ = ['feature_segment_scores']


def feature_segment_scores(store: FeatureStore, samples: Sequence[AnticipationSample],
                           model: MalmmModel, settings: Protocol, *,
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
        runner = WindowModel(model, MemorySpec(settings.memory_bank_length))
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
