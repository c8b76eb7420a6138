"""The evaluation modes from files to an `Evaluation`: direct (a bag through the pipeline) and
features (a split from extracted features); live mode (malmm_ros.ros.live_eval) scores its
timeline with `evaluate_timeline` exactly as direct mode does.

Settings come from the checkpoint: it records the anticipation time, window, sampling rate and
memory length it was trained with. Direct and live mode run the node's config
(config/anticipate.yaml); its sample_fps and memory_bank_length must equal the checkpoint's
unless they are overridden on purpose, and its model section must match the weights.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from malmm_ros.config import AnticipateConfig, TextConfig, load_config
from malmm_ros.data.epic import (
    TAIL_NOUNS_FILE,
    TAIL_VERBS_FILE,
    UNSEEN_VALIDATION_FILE,
    AnticipationSample,
    Segment,
    load_segments,
    load_tail_classes,
    load_unseen_participants,
    samples_from_segments,
)
from malmm_ros.data.features import FeatureStore
from malmm_ros.errors import CheckpointError, ConfigError, DataError
from malmm_ros.evaluation.feature_scores import (
    feature_segment_scores,
)
from malmm_ros.evaluation.report import Evaluation, latency_summary
from malmm_ros.evaluation.scoring import TOP_PAIRS, score_segments, segment_metrics
from malmm_ros.evaluation.timeline import Timeline, bag_timeline
from malmm_ros.labels import LabelMaps
from malmm_ros.model.checkpoint import is_trained, load_checkpoint, read_checkpoint_metadata
from malmm_ros.protocol import Protocol

__all__ = ['AnnotationContext', 'Checkpoint', 'evaluate_direct', 'evaluate_features',
           'evaluate_timeline', 'load_annotations', 'node_config', 'open_checkpoint',
           'video_segments']

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's path, metadata, labels and the protocol it was trained with."""

    path: Path
    metadata: dict[str, Any]
    labels: LabelMaps
    protocol: Protocol

    @property
    def trained(self) -> bool:
        """False for an untrained checkpoint (malmm-export checkpoint --untrained)."""
        return is_trained(self.metadata)

    @property
    def action_scoring(self) -> str:
        if self.labels.num_actions:
            return f'action head ({self.labels.num_actions} actions)'
        return f'p(verb) x p(noun) (top {TOP_PAIRS} pairs)'


def open_checkpoint(path: str | os.PathLike, **overrides: Any) -> Checkpoint:
    """Read a checkpoint's metadata and labels (CheckpointError for anything unusable);
    `overrides` (tau_a, tau_o, sample_fps, memory_bank_length, max_feature_lag_s; None
    ignored) replace the trained protocol."""
    path = Path(path)
    metadata = read_checkpoint_metadata(path)
    try:
        labels = LabelMaps.from_dict(metadata.get('labels', {}), source=f'{path} labels')
    except (DataError, TypeError, ValueError) as exc:
        raise CheckpointError(f'checkpoint {path}: bad labels: {exc}') from None
    try:
        protocol = Protocol.from_metadata(metadata, **overrides)
    except CheckpointError as exc:
        raise CheckpointError(f'checkpoint {path}: {exc}') from None
    return Checkpoint(path, metadata, labels, protocol)


def node_config(source: str | os.PathLike | None, checkpoint: Checkpoint, *,
                sample_fps: float | None = None, memory_bank_length: int | None = None
                ) -> AnticipateConfig:
    """The node's config with the checkpoint set, text descriptions off, and sampling and
    memory checked against the checkpoint (or overridden: explicit values always win).

    ConfigError when the config samples or remembers differently from the training, since
    the scores would then not be the checkpoint's.
    """
    config = load_config(source)
    where = str(source) if source is not None else 'the default config'
    changes: dict[str, Any] = {'checkpoint': str(checkpoint.path)}
    for name, explicit, flag in (('sample_fps', sample_fps, '--sample-fps'),
                                 ('memory_bank_length', memory_bank_length, '--memory-length')):
        if explicit is not None:
            changes[name] = explicit
            continue
        trained = Protocol.stored(checkpoint.metadata).get(name)
        if trained is not None and trained != getattr(config, name):
            raise ConfigError(
                f'{where}: {name} is {getattr(config, name)!r} but checkpoint '
                f'{checkpoint.path} was trained with {trained!r}; use a config that matches '
                f'or pass {flag} to evaluate with another value on purpose')
    config = config.replace(**changes)
    config = config.replace(text=TextConfig(enabled=False))  # not scored; saves the CPU
    if config.sample_fps <= 0:
        raise ConfigError(f'{where}: sample_fps is 0 (every frame); evaluation samples at the '
                          'rate the checkpoint was trained with; pass --sample-fps')
    stored = checkpoint.metadata.get('model') or {}
    wanted = config.model.architecture()
    diffs = [f'{name}: config {wanted[name]!r} vs checkpoint {stored[name]!r}'
             for name in wanted if name in stored and stored[name] != wanted[name]]
    if diffs:
        raise CheckpointError(f'checkpoint {checkpoint.path} does not match the model section '
                              f'of {where}: ' + '; '.join(diffs))
    return config


@dataclass(frozen=True)
class AnnotationContext:
    """The segments to score and the subsets of the report."""

    csv: Path
    segments: tuple[Segment, ...]
    tail_verbs: frozenset[int] | None
    tail_nouns: frozenset[int] | None
    unseen: frozenset[str] | None
    missing: tuple[str, ...]  # optional files not found (subsets left out)


def load_annotations(csv: str | os.PathLike, labels: LabelMaps, *,
                     annotations_dir: str | os.PathLike | None = None) -> AnnotationContext:
    """Segments of an EK-100 CSV (class ids checked against the checkpoint's labels), and the
    tail classes and unseen participants from `annotations_dir` (default: the CSV's folder)."""
    csv = Path(csv)
    try:
        segments = load_segments(csv, num_verbs=labels.num_verbs, num_nouns=labels.num_nouns)
    except DataError as exc:
        if 'out of range' in str(exc):
            raise DataError(f'{exc} (the checkpoint knows {labels.num_verbs} verbs and '
                            f'{labels.num_nouns} nouns: annotations and checkpoint disagree)'
                            ) from None
        raise
    folder = Path(annotations_dir) if annotations_dir is not None else csv.parent
    if annotations_dir is not None and not folder.is_dir():
        raise DataError(f'--annotations-dir {folder} is not a folder')
    missing = []
    tails: list[frozenset[int] | None] = []
    for name, count in ((TAIL_VERBS_FILE, labels.num_verbs),
                        (TAIL_NOUNS_FILE, labels.num_nouns)):
        file = folder / name
        tails.append(load_tail_classes(file, num_classes=count) if file.is_file() else None)
        if not file.is_file():
            missing.append(str(file))
    unseen_file = folder / UNSEEN_VALIDATION_FILE
    unseen = load_unseen_participants(unseen_file) if unseen_file.is_file() else None
    if unseen is None:
        missing.append(str(unseen_file))
    if missing:
        _log.info('subsets left out for want of %s', ', '.join(missing))
    return AnnotationContext(csv, tuple(segments), tails[0], tails[1], unseen, tuple(missing))


def video_segments(context: AnnotationContext, video_id: str) -> list[Segment]:
    """The segments of one video, in file order; DataError naming the CSV if it has none."""
    chosen = [s for s in context.segments if s.video_id == video_id]
    if not chosen:
        videos = sorted({s.video_id for s in context.segments})
        listed = ', '.join(videos[:12]) + (' ...' if len(videos) > 12 else '')
        raise DataError(f'video {video_id!r} has no segments in {context.csv} ({len(videos)} '
                        f'videos: {listed})')
    return chosen


def _metrics(scores: Any, context: AnnotationContext) -> dict[str, Any] | None:
    if not scores.labelled:
        return None
    return segment_metrics(scores, tail_verbs=context.tail_verbs,
                           tail_nouns=context.tail_nouns, unseen_participants=context.unseen)


def evaluate_timeline(mode: str, timeline: Timeline, samples: Sequence[AnticipationSample],
                      checkpoint: Checkpoint, context: AnnotationContext, *,
                      settings: dict[str, Any], inputs: dict[str, Any], runtime_s: float,
                      extra: dict[str, Any] | None = None) -> Evaluation:
    """Score the samples of one video on a timeline (direct or live) and measure them."""
    scores = score_segments(samples, timeline.times_s, timeline.rows)
    last = timeline.stats.get('last_frame_s')
    after = (sum(1 for s in samples if s.observe_end_s is not None and s.observe_end_s > last)
             if last is not None else 0)
    frames = {key: timeline.stats[key] for key in ('frames', 'sampled', 'bad_frames',
                                                    'predictions', 'resets', 'wall_s')
              if key in timeline.stats}
    record = {'timeline': {**frames, 'segments_after_last_frame': after}}
    return Evaluation(mode, scores, checkpoint.labels, _metrics(scores, context), settings,
                      inputs, runtime_s, {**record, **(extra or {})},
                      checkpoint=str(checkpoint.path.resolve()), trained=checkpoint.trained)


def evaluate_direct(bag: str | os.PathLike, video_id: str, checkpoint: Checkpoint,
                    context: AnnotationContext, config: AnticipateConfig, *,
                    topic: str | None = None, video_start_ns: int | None = None,
                    progress: bool = False) -> tuple[Evaluation, Timeline]:
    """Direct mode: every frame of the bag through the pipeline, scored per segment."""
    began = time.perf_counter()
    segments = video_segments(context, video_id)
    tau_a = checkpoint.protocol.tau_a
    samples = samples_from_segments(segments, tau_a, checkpoint.protocol.tau_o)
    timeline = bag_timeline(bag, config, topic=topic, video_start_ns=video_start_ns,
                            progress=progress, description=f'direct {video_id}')
    settings = {'tau_a': tau_a, 'sample_fps': config.sample_fps,
                'memory_bank_length': config.memory_bank_length,
                'publish_every_n': config.publish_every_n, 'backend': config.backend,
                'action_scores': checkpoint.action_scoring}
    inputs = {'bag': str(bag), 'video_id': video_id, 'annotations': str(context.csv),
              'checkpoint': str(checkpoint.path), 'topic': topic,
              'video_start_ns': timeline.origin_ns}
    steps = latency_summary(timeline.latency_ms)
    evaluation = evaluate_timeline('direct', timeline, samples, checkpoint, context,
                                   settings=settings, inputs=inputs,
                                   runtime_s=time.perf_counter() - began,
                                   extra={'step_latency_ms': steps} if steps else None)
    return evaluation, timeline


def evaluate_features(features: str | os.PathLike, checkpoint: Checkpoint,
                      context: AnnotationContext, *, video_ids: Sequence[str] | None = None,
                      batch_size: int = 32, progress: bool = False) -> Evaluation:
    """Features mode: every segment of the split (or of `video_ids`) from extracted features."""
    began = time.perf_counter()
    store = FeatureStore(features)
    segments = list(context.segments)
    if video_ids:
        for video_id in video_ids:
            video_segments(context, video_id)  # DataError for a video the CSV lacks
        wanted = set(video_ids)
        segments = [s for s in segments if s.video_id in wanted]
    protocol = checkpoint.protocol
    samples = samples_from_segments(segments, protocol.tau_a, protocol.tau_o)
    model = load_checkpoint(checkpoint.path)
    scores, windows = feature_segment_scores(store, samples, model, protocol,
                                             batch_size=batch_size, progress=progress)
    settings = {**protocol.to_dict(), 'action_scores': checkpoint.action_scoring}
    inputs = {'features': str(store.directory), 'annotations': str(context.csv),
              'checkpoint': str(checkpoint.path),
              'videos': sorted({s.video_id for s in segments})}
    return Evaluation('features', scores, checkpoint.labels, _metrics(scores, context),
                      settings, inputs, time.perf_counter() - began, {'windows': windows},
                      checkpoint=str(checkpoint.path.resolve()), trained=checkpoint.trained)
