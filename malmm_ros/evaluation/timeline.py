"""Timelines: every prediction over one video, with its video time and its full scores.

Direct mode (`bag_timeline`) reads every message of a camera bag, samples by stamp exactly as
the node does (the pipeline's sampling stage decides before a frame is decoded and the
pipeline takes the frame with that verdict), decodes only the sampled frames and keeps, for
each prediction, the softmax of every verb, noun and action. It runs one frame at a time in
bag order, so it is deterministic and drops nothing: the reference the live run is compared
with.

Live mode's messages (/malmm/actions JSON v1, top-5 lists) become a timeline through
`timeline_from_predictions`, with zeros for the classes the messages do not list.

Video time is the header stamp minus the stamp of the video's first frame: the bag's first
frame by default, or an explicit `video_start_ns` when the recording started late.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from malmm_ros.config import AnticipateConfig
from malmm_ros.data.bags import bag_info, image_topics, iter_camera_messages
from malmm_ros.errors import DataError, FrameError
from malmm_ros.evaluation.scoring import ScoreRows
from malmm_ros.labels import LabelMaps
from malmm_ros.pipeline.anticipation import AnticipationPipeline, StepScores
from malmm_ros.pipeline.prediction import SCHEMA
from malmm_ros.stamps import stamp_ns

__all__ = ['Timeline', 'bag_timeline', 'timeline_from_predictions']

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Timeline:
    """Predictions in video-time order: times_s [T], stamps_ns [T], scores (T rows).

    `latency_ms` [T] is the pipeline's step time (direct) or the end-to-end time from
    publishing the frame to receiving its prediction (live). `stats` counts frames.
    """

    times_s: np.ndarray
    stamps_ns: np.ndarray
    rows: ScoreRows
    origin_ns: int  # the stamp of video time 0
    latency_ms: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.times_s.shape[0])

    def with_times(self, times_s: np.ndarray) -> Timeline:
        """The same predictions placed at other video times (e.g. when they arrived), sorted."""
        times = np.asarray(times_s, dtype=np.float64)
        if times.shape != self.times_s.shape:
            raise ValueError(f'{times.shape} times for {len(self)} predictions')
        order = np.argsort(times, kind='stable')
        return replace(self, times_s=times[order], stamps_ns=self.stamps_ns[order],
                       rows=self.rows.take(order), latency_ms=self.latency_ms[order])


def _video_times(stamps_ns: Sequence[int], origin_ns: int) -> np.ndarray:
    # Integer nanoseconds first: float64 cannot hold a 2023 epoch stamp to the nanosecond.
    return (np.asarray(stamps_ns, dtype=np.int64) - np.int64(origin_ns)) / 1e9


def bag_timeline(bag: str | os.PathLike, config: AnticipateConfig, *, topic: str | None = None,
                 video_start_ns: int | None = None, progress: bool = False,
                 description: str = 'direct') -> Timeline:
    """Run the pipeline of `config` (checkpoint included) over every frame of the bag.

    Frames are sampled at config.sample_fps by header stamp, as the node samples them; the
    pipeline predicts every config.publish_every_n sampled frames. Frames whose pixels cannot
    be used are skipped and counted (`stats['bad_frames']`), as the node does. DataError for a
    bag without an image topic (or with several and no `topic`) and for stamps going
    backwards (a looped recording is not one video).
    """
    bag = Path(bag)
    topics = image_topics(bag)  # DataError for a missing or unreadable bag
    if not topics:
        found = sorted(bag_info(bag)['topics'])
        raise DataError(f'{bag} holds no sensor_msgs/Image or CompressedImage topic (it has '
                        f'{found})')
    pipeline = AnticipationPipeline(config)
    info = bag_info(bag)
    total = (info['topics'][topic]['count'] if topic in info['topics']
             else sum(t['count'] for name, t in info['topics'].items() if name in topics))
    collected = _Predictions()
    stats = {'frames': 0, 'sampled': 0, 'bad_frames': 0, 'predictions': 0, 'resets': 0}
    first_ns: int | None = None
    last_ns: int | None = None
    began = time.perf_counter()
    bar = tqdm(total=total, desc=description, unit='frame', disable=not progress)
    try:
        for message in iter_camera_messages(bag, topic):
            bar.update()
            stats['frames'] += 1
            stamp = message.stamp_ns
            if first_ns is None:
                first_ns = stamp
            if last_ns is not None and stamp < last_ns:
                raise DataError(
                    f'{bag}: the stamp of the message at log time {message.log_time_ns} ns goes '
                    f'back by {(last_ns - stamp) / 1e9:.3f} s; evaluation needs one pass over '
                    'one video (split looped or concatenated recordings)')
            last_ns = stamp
            admission = pipeline.sampler.admit(stamp)  # before decoding, as the node does
            if not admission.accepted:
                continue
            stats['sampled'] += 1
            try:
                prediction = pipeline.push(message.decode(), stamp, message.frame_id,
                                           admission=admission)
            except FrameError as exc:
                stats['bad_frames'] += 1
                _log.warning('%s: bad frame skipped: %s', bag, exc)
                continue
            if prediction is None:
                continue
            scores = pipeline.scores()
            assert scores is not None  # a prediction implies a step
            collected.add(stamp, scores, prediction.latency_ms.get('total', float('nan')))
    finally:
        bar.close()
    if first_ns is None:
        raise DataError(f'{bag}: the image topic holds no messages')
    origin = first_ns if video_start_ns is None else int(video_start_ns)
    stats.update(predictions=len(collected.stamps), resets=pipeline.stats['resets'],
                 wall_s=round(time.perf_counter() - began, 3), first_stamp_ns=first_ns,
                 last_stamp_ns=last_ns, last_frame_s=(last_ns - origin) / 1e9)
    return Timeline(_video_times(collected.stamps, origin),
                    np.asarray(collected.stamps, dtype=np.int64), collected.rows(pipeline.labels),
                    origin, np.asarray(collected.latency, dtype=np.float64), stats)


class _Predictions:
    """Every prediction of a direct run: stamps, full scores and latency, in order."""

    def __init__(self) -> None:
        self.stamps: list[int] = []
        self.latency: list[float] = []
        self._verbs: list[np.ndarray] = []
        self._nouns: list[np.ndarray] = []
        self._actions: list[np.ndarray] | None = []  # None: no action head (pairs instead)

    def add(self, stamp_ns: int, scores: StepScores, latency_ms: float) -> None:
        self.stamps.append(stamp_ns)
        self.latency.append(latency_ms)
        self._verbs.append(scores.verb)
        self._nouns.append(scores.noun)
        if scores.action is None:
            self._actions = None
        elif self._actions is not None:
            self._actions.append(scores.action)

    def rows(self, labels: LabelMaps) -> ScoreRows:
        if not self.stamps:
            return ScoreRows.empty(labels.num_verbs, labels.num_nouns)
        actions = np.stack(self._actions) if self._actions else None
        return ScoreRows.from_dense(np.stack(self._verbs), np.stack(self._nouns), actions,
                                    labels)


def _class_row(entries: Any, size: int, kind: str, where: str) -> np.ndarray:
    row = np.zeros(size, np.float32)
    if not isinstance(entries, list):
        raise DataError(f'{where}: "{kind}" must be a list')
    for entry in entries:
        try:
            index, score = int(entry['id']), float(entry['score'])
        except (KeyError, TypeError, ValueError):
            raise DataError(f'{where}: bad "{kind}" entry {entry!r}') from None
        if not 0 <= index < size:
            raise DataError(f'{where}: {kind} id {index} is outside 0..{size - 1}; was the node '
                            'running another checkpoint?')
        row[index] = score
    return row


def _stamp_ns(message: Mapping[str, Any], where: str) -> int:
    try:
        return stamp_ns(message['stamp'])
    except (KeyError, TypeError, ValueError, FrameError):
        raise DataError(f'{where}: no valid "stamp" {{sec, nanosec}}') from None


def timeline_from_predictions(messages: Sequence[Mapping[str, Any]], labels: LabelMaps, *,
                              origin_ns: int, latency_ms: Sequence[float] | None = None,
                              stats: dict[str, Any] | None = None) -> Timeline:
    """A timeline from /malmm/actions messages (malmm_ros/actions/v1 dicts), ordered by stamp.

    Only their top-k lists are known: every other class scores zero. A message of another
    schema or with ids outside `labels` is a DataError.
    """
    stamps, verbs, nouns, actions = [], [], [], []
    for i, message in enumerate(messages):
        where = f'/malmm/actions message {i}'
        if not isinstance(message, Mapping) or message.get('schema') != SCHEMA:
            found = message.get('schema') if isinstance(message, Mapping) else message
            raise DataError(f'{where}: schema {found!r}, expected {SCHEMA!r}')
        stamps.append(_stamp_ns(message, where))
        verbs.append(_class_row(message.get('verb'), labels.num_verbs, 'verb', where))
        nouns.append(_class_row(message.get('noun'), labels.num_nouns, 'noun', where))
        pairs: dict[tuple[int, int], float] = {}
        entries = message.get('action')
        if not isinstance(entries, list):
            raise DataError(f'{where}: "action" must be a list')
        for entry in entries:
            try:
                pair = (int(entry['verb_id']), int(entry['noun_id']))
                pairs[pair] = float(entry['score'])
            except (KeyError, TypeError, ValueError):
                raise DataError(f'{where}: bad "action" entry {entry!r}') from None
            if not (0 <= pair[0] < labels.num_verbs and 0 <= pair[1] < labels.num_nouns):
                raise DataError(f'{where}: action {pair} is outside the label maps')
        actions.append(pairs)
    delays = np.full(len(stamps), np.nan) if latency_ms is None else np.asarray(
        latency_ms, dtype=np.float64)
    if delays.shape != (len(stamps),):
        raise ValueError(f'{delays.shape} latencies for {len(stamps)} messages')
    if not stamps:
        rows = ScoreRows.empty(labels.num_verbs, labels.num_nouns)
        return Timeline(np.zeros(0), np.zeros(0, np.int64), rows, int(origin_ns), delays,
                        dict(stats or {}))
    rows = ScoreRows.from_sparse(np.stack(verbs), np.stack(nouns), actions)
    order = np.argsort(np.asarray(stamps, dtype=np.int64), kind='stable')
    ordered = np.asarray(stamps, dtype=np.int64)[order]
    return Timeline(_video_times(ordered, origin_ns), ordered, rows.take(order), int(origin_ns),
                    delays[order], dict(stats or {}))
