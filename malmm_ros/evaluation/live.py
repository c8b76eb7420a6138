"""Scoring of live mode: what the node published over ROS 2, scored like direct mode.

The recording comes from malmm_ros.ros.live_eval (the node in its own process, the bag replayed
into it). Its predictions are scored exactly like direct mode's (top-5 lists, zeros elsewhere):
the gap to direct mode is what dropped and lost frames cost. A second scoring places each
prediction at the video time it arrived (stamp + end-to-end latency x rate), so latency costs
as well. Nothing here needs ROS.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from malmm_ros.config import AnticipateConfig
from malmm_ros.evaluation.modes import AnnotationContext, Checkpoint, evaluate_timeline
from malmm_ros.evaluation.report import Evaluation, latency_summary, metric_gap
from malmm_ros.evaluation.scoring import score_segments, segment_metrics
from malmm_ros.evaluation.timeline import Timeline, timeline_from_predictions

__all__ = ['LiveRun', 'score_live']


class _ReplayCounts(Protocol):
    published: int
    wall_s: float


class LiveRun(Protocol):
    """What scoring reads of a live run (malmm_ros.ros.live_eval.LiveRecording)."""

    messages: list[dict[str, Any]]  # /malmm/actions, decoded
    diagnostics: dict[str, str]  # the node's last /diagnostics values
    replay: _ReplayCounts
    node_log: Path | None
    node_exit: int | None


def score_live(run: LiveRun, latency_ms: np.ndarray, checkpoint: Checkpoint,
               context: AnnotationContext, config: AnticipateConfig, direct: Evaluation,
               direct_timeline: Timeline, *, rate: float, domain_id: int | None, began: float
               ) -> tuple[Evaluation, dict[str, Any]]:
    """(the live evaluation, its metrics record with the stream counts, end-to-end latency,
    metrics by arrival time and the gap to direct mode).

    `latency_ms`: per message of `run`, NaN where unknown; `rate`: the replay's; `began`:
    time.perf_counter() when the live run started (its runtime counts the recording).
    """
    stream = _stream_counts(run, len(direct_timeline), rate)
    timeline = timeline_from_predictions(run.messages, checkpoint.labels,
                                         origin_ns=direct_timeline.origin_ns,
                                         latency_ms=latency_ms,
                                         stats={'predictions': len(run.messages)})
    direct_stamps = set(direct_timeline.stamps_ns.tolist())
    live_stamps = set(timeline.stamps_ns.tolist())
    stream['missing_predictions'] = len(direct_stamps - live_stamps)
    stream['unexpected_predictions'] = len(live_stamps - direct_stamps)
    stream['same_top1_action_as_direct'] = _agreement(timeline, direct_timeline)

    samples = direct.scores.samples
    settings = {**direct.settings, 'rate': rate, 'qos': config.qos.reliability,
                'domain_id': domain_id if domain_id is not None else os.environ.get(
                    'ROS_DOMAIN_ID', '0')}
    inputs = {**direct.inputs, 'node_log': str(run.node_log)}
    live = evaluate_timeline('live', timeline, samples, checkpoint, context, settings=settings,
                             inputs=inputs, runtime_s=time.perf_counter() - began)
    live.latency_ms = latency_ms
    # The same predictions placed where they arrived: video time of the frame plus the
    # latency on the bag's clock (the replay plays `rate` bag seconds per second).
    arrived = timeline.with_times(timeline.times_s + np.nan_to_num(timeline.latency_ms) * 1e-3
                                  * rate)
    arrival_scores = score_segments(samples, arrived.times_s, arrived.rows)
    arrival_metrics = None
    if live.metrics is not None:
        arrival_metrics = segment_metrics(arrival_scores, tail_verbs=context.tail_verbs,
                                          tail_nouns=context.tail_nouns,
                                          unseen_participants=context.unseen)
    record = live.to_dict()
    record.update({
        'stream': stream,
        'latency_ms': latency_summary(latency_ms),
        'arrival_metrics': arrival_metrics,
        'arrival_segments': arrival_scores.counts(),
        'direct': {'metrics_file': 'direct/metrics.json', 'segments': direct.scores.counts()},
    })
    if live.metrics is not None and direct.metrics is not None:
        record['gap_to_direct'] = metric_gap(live.metrics, direct.metrics)
        record['arrival_gap_to_direct'] = metric_gap(arrival_metrics, direct.metrics)
    return live, record


def _stream_counts(run: LiveRun, expected: int, rate: float) -> dict[str, Any]:
    """Frames and predictions along the way: replay, node, transport (the record's 'stream')."""
    node = run.diagnostics
    stream = {
        'published': run.replay.published,
        'frames_in': _int(node, 'frames_in'),
        'frames_sampled': _int(node, 'frames_sampled'),
        'processed': _int(node, 'processed'),
        'dropped_by_node': _int(node, 'dropped'),
        'bad_frames': _int(node, 'bad_frames'),
        'resets': _int(node, 'resets'),
        'predictions': len(run.messages),
        'expected_predictions': expected,
        'replay_wall_s': round(run.replay.wall_s, 3),
        'rate': rate,
        'node_exit_code': run.node_exit,
    }
    frames_in = stream['frames_in']
    stream['lost_in_transport'] = (None if frames_in is None
                                   else stream['published'] - frames_in)
    return stream


def _int(values: dict[str, str], key: str) -> int | None:
    try:
        return int(values[key])
    except (KeyError, ValueError):
        return None


def _agreement(live: Timeline, direct: Timeline) -> float | None:
    """Fraction of the stamps both timelines predicted at whose top-1 action is the same."""
    index = {int(s): i for i, s in enumerate(direct.stamps_ns)}
    pairs = [(i, index[int(s)]) for i, s in enumerate(live.stamps_ns) if int(s) in index]
    if not pairs:
        return None

    def top_action(rows: Any, i: int) -> tuple[int, int]:
        j = int(np.argmax(rows.action[i])) if rows.action.shape[1] else -1
        return tuple(rows.action_pairs[j]) if j >= 0 else (-1, -1)

    same = sum(top_action(live.rows, i) == top_action(direct.rows, j) for i, j in pairs)
    return same / len(pairs)
