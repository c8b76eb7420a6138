"""malmm-eval --live: the node in its own process, the bag replayed into it over ROS 2.

The node (malmm_anticipate) runs as a separate process with the evaluation's config written
as a parameter file (checkpoint, sampling and memory as in direct mode; text descriptions
off), the project's Fast DDS profile and discovery kept on this machine. This process replays
the bag with its original timing (malmm_ros.ros.replay.replay, raw CDR bytes untouched) and
records every /malmm/actions message with its receive time and the latest /diagnostics of
the node. The predictions are then scored exactly like direct mode's (top-5 lists, zeros
elsewhere): the gap to direct mode is what dropped and lost frames cost. A second scoring
places each prediction at the video time it arrived (stamp + end-to-end latency x rate), so
latency costs as well.

End-to-end latency: from publishing a frame (monotonic clock, this process) to receiving the
prediction stamped with it (same clock).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
import yaml
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.publisher import Publisher
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from malmm_ros.config import AnticipateConfig
from malmm_ros.data.bags import COMPRESSED_IMAGE_TYPE, bag_info, image_topics
from malmm_ros.errors import DataError, MalmmError
from malmm_ros.evaluation import (
    AnnotationContext,
    Checkpoint,
    Evaluation,
    Timeline,
    evaluate_timeline,
    latency_summary,
    metric_gap,
    score_segments,
    segment_metrics,
    timeline_from_predictions,
)
from malmm_ros.ros.processes import stop_process
from malmm_ros.ros.replay import ReplayStats, replay

__all__ = ['LiveRecording', 'evaluate_live', 'record_live']

NODE_NAME = 'malmm_anticipate'
ACTIONS_TOPIC = '/malmm/actions'
_DDS_PROFILE = Path(__file__).resolve().parents[2] / 'config' / 'fastdds.xml'
_SETTLE_S = 2.0  # no new prediction for this long after the replay: the node is done
_MAX_SETTLE_S = 60.0
_POLL_S = 0.02
_MATCH_GRACE_S = 1.0
# Reliable with a deep queue: the camera side must not lose frames before the node's own
# (best-effort, depth-1) subscription decides; the action side must keep every prediction.
_CAMERA_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                         reliability=ReliabilityPolicy.RELIABLE)
_ACTIONS_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000,
                          reliability=ReliabilityPolicy.RELIABLE)


@dataclass
class LiveRecording:
    """What one live run saw: predictions with receive times, frames with publish times."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    received_s: list[float] = field(default_factory=list)  # monotonic, per message
    published_s: dict[int, float] = field(default_factory=dict)  # frame stamp -> monotonic
    diagnostics: dict[str, str] = field(default_factory=dict)  # the node's latest values
    diagnostics_s: float = 0.0  # monotonic receive time of those values
    replay: ReplayStats = field(default_factory=ReplayStats)
    node_log: Path | None = None
    node_exit: int | None = None


def cdr_stamp_ns(rawdata: bytes) -> int | None:
    """Header stamp of a serialized Image / CompressedImage (the header comes first).

    CDR: a 4-byte encapsulation header (byte 1 bit 0 set: little endian), then stamp.sec
    (int32) and stamp.nanosec (uint32). None for anything shorter.
    """
    if len(rawdata) < 12:
        return None
    order = '<' if rawdata[1] & 1 else '>'
    sec, nanosec = struct.unpack_from(f'{order}iI', rawdata, 4)
    return sec * 1_000_000_000 + nanosec


class _TimedPublisher:
    """Publishes serialized frames and notes when each stamp went out."""

    def __init__(self, publisher: Publisher, recording: LiveRecording) -> None:
        self.publisher = publisher
        self.recording = recording

    def publish(self, rawdata: bytes) -> None:
        stamp = cdr_stamp_ns(rawdata)
        if stamp is not None:
            self.recording.published_s.setdefault(stamp, time.monotonic())
        self.publisher.publish(rawdata)


class _Recorder:
    """Subscriptions of the evaluator: predictions and the node's diagnostics."""

    def __init__(self, node: Node, recording: LiveRecording) -> None:
        self.recording = recording
        self.lock = threading.Lock()
        node.create_subscription(String, ACTIONS_TOPIC, self.actions_callback, _ACTIONS_QOS)
        node.create_subscription(DiagnosticArray, '/diagnostics', self.diagnostics_callback,
                                 10)

    def actions_callback(self, msg: String) -> None:
        now = time.monotonic()
        try:
            message = json.loads(msg.data)
        except json.JSONDecodeError:
            return  # not ours; the schema check later reports foreign messages
        with self.lock:
            self.recording.messages.append(message)
            self.recording.received_s.append(now)

    def diagnostics_callback(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith(NODE_NAME):
                with self.lock:
                    self.recording.diagnostics = {kv.key: kv.value for kv in status.values}
                    self.recording.diagnostics_s = time.monotonic()

    def count(self) -> int:
        with self.lock:
            return len(self.recording.messages)


@contextlib.contextmanager
def _environment(values: dict[str, str | None]) -> Iterator[None]:
    """Set (None: remove) environment variables for the block, then restore them."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _ros_environment(domain_id: int | None) -> dict[str, str | None]:
    profile = os.environ.get('FASTDDS_DEFAULT_PROFILES_FILE') or (
        str(_DDS_PROFILE) if _DDS_PROFILE.is_file() else None)
    values: dict[str, str | None] = {'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST',
                                     'ROS_STATIC_PEERS': None,
                                     'FASTDDS_DEFAULT_PROFILES_FILE': profile}
    if domain_id is not None:
        values['ROS_DOMAIN_ID'] = str(domain_id)
    return values


def _write_params(path: Path, config: AnticipateConfig, transport: str) -> Path:
    parameters = config.replace(input_transport=transport).to_dict()
    if parameters['checkpoint']:  # empty: untrained heads, not the current folder
        parameters['checkpoint'] = str(Path(parameters['checkpoint']).resolve())
    path.write_text(yaml.safe_dump({'/**': {'ros__parameters': parameters}}, sort_keys=False))
    return path


def _log_tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.is_file():
        return ''
    text = path.read_text(errors='replace').strip().splitlines()
    return '\n'.join(text[-lines:])


def _wait(condition: Any, timeout: float, process: subprocess.Popen, what: str,
          log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise MalmmError(f'the node exited with code {process.returncode} while {what}; '
                             f'its log {log} ends:\n{_log_tail(log)}')
        if time.monotonic() > deadline:
            raise MalmmError(f'timed out after {timeout:.0f} s {what}; the node log {log} '
                             f'ends:\n{_log_tail(log)}')
        time.sleep(_POLL_S)


def record_live(bag: str | os.PathLike, config: AnticipateConfig, *, out_dir: str | os.PathLike,
                topic: str | None = None, rate: float = 1.0, domain_id: int | None = None,
                node_timeout_s: float = 120.0, expected_predictions: int | None = None,
                progress: bool = True) -> LiveRecording:
    """Start the node, replay the bag into it, record its predictions, stop it.

    The node's output goes to `out_dir`/node.log and its parameters to node_params.yaml.
    MalmmError when the node does not start in `node_timeout_s` or dies.
    """
    bag = Path(bag)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    topics = image_topics(bag)
    if topic is None:
        if len(topics) != 1:
            what = 'no image topic' if not topics else f'several image topics {sorted(topics)}'
            raise DataError(f'{bag} has {what}; choose one with --topic')
        topic = next(iter(topics))
    elif topic not in topics:
        raise DataError(f'{bag} has no image topic {topic!r}; its image topics are '
                        f'{sorted(topics)}')
    compressed = topics[topic] == COMPRESSED_IMAGE_TYPE
    params = _write_params(out_dir / 'node_params.yaml', config,
                           'compressed' if compressed else 'raw')
    remap = f'image/compressed:={topic}' if compressed else f'image:={topic}'
    command = [sys.executable, '-m', 'malmm_ros.ros.anticipate_main', '--ros-args',
               '--params-file', str(params), '-r', remap]
    log_path = out_dir / 'node.log'
    recording = LiveRecording(node_log=log_path)
    total = bag_info(bag)['topics'][topic]['count']

    with _environment(_ros_environment(domain_id)), open(log_path, 'wb') as log:
        node_process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT)
        context = Context()
        node = executor = thread = None
        try:
            rclpy.init(context=context, domain_id=domain_id,
                       signal_handler_options=SignalHandlerOptions.NO)
            node = Node('malmm_eval_live', context=context)
            recorder = _Recorder(node, recording)
            message_type = CompressedImage if compressed else Image
            publisher = node.create_publisher(message_type, topic, _CAMERA_QOS)
            executor = SingleThreadedExecutor(context=context)
            executor.add_node(node)
            thread = threading.Thread(target=_spin, args=(executor,), name='malmm_eval_spin',
                                      daemon=True)
            thread.start()
            _wait(lambda: publisher.get_subscription_count() >= 1
                  and node.count_publishers(ACTIONS_TOPIC) >= 1,
                  node_timeout_s, node_process, f'for the node to subscribe to {topic}',
                  log_path)
            # Our writer has matched the node's reader; give the node's side of discovery
            # time to match ours too, or its best-effort reader drops the first frames (and
            # its sampling grid starts on a later one).
            time.sleep(_MATCH_GRACE_S)
            quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(
                io.StringIO())  # replay() always draws a progress bar on sys.stderr
            with quiet:
                recording.replay = replay(bag, {topic: _TimedPublisher(publisher, recording)},
                                          rate=rate, ok=context.ok, progress_total=total)
            _settle(recorder, recording, node_process, expected_predictions, log_path)
        finally:
            recording.node_exit = stop_process(node_process)
            if executor is not None:
                executor.shutdown(timeout_sec=5.0)
            if thread is not None:
                thread.join(timeout=5.0)
            if node is not None:
                node.destroy_node()
            rclpy.try_shutdown(context=context)
    return recording


def _spin(executor: SingleThreadedExecutor) -> None:
    try:
        executor.spin()
    except ExternalShutdownException:
        pass


def _settle(recorder: _Recorder, recording: LiveRecording, process: subprocess.Popen,
            expected: int | None, log: Path) -> None:
    """Wait for the last predictions, then for diagnostics sent after them."""
    began = time.monotonic()
    count, changed = recorder.count(), time.monotonic()
    while time.monotonic() - changed < _SETTLE_S and time.monotonic() - began < _MAX_SETTLE_S:
        if expected is not None and recorder.count() >= expected:
            break
        if process.poll() is not None:
            raise MalmmError(f'the node exited with code {process.returncode} during the replay; '
                             f'its log {log} ends:\n{_log_tail(log)}')
        time.sleep(_POLL_S)
        if recorder.count() != count:
            count, changed = recorder.count(), time.monotonic()
    last = time.monotonic()
    deadline = last + 3.0  # diagnostics come once a second
    while time.monotonic() < deadline:
        with recorder.lock:
            if recording.diagnostics_s > last:
                return
        time.sleep(_POLL_S)


def _int(values: dict[str, str], key: str) -> int | None:
    try:
        return int(values[key])
    except (KeyError, ValueError):
        return None


def evaluate_live(bag: str | os.PathLike, video_id: str, checkpoint: Checkpoint,
                  context: AnnotationContext, config: AnticipateConfig, direct: Evaluation,
                  direct_timeline: Timeline, *, out_dir: str | os.PathLike,
                  topic: str | None = None, rate: float = 1.0, domain_id: int | None = None,
                  node_timeout_s: float = 120.0, progress: bool = True
                  ) -> tuple[Evaluation, dict[str, Any]]:
    """Live mode after direct mode: (the live evaluation, its metrics record with the stream
    counts, end-to-end latency, metrics by arrival time and the gap to direct mode)."""
    began = time.perf_counter()
    recording = record_live(bag, config, out_dir=out_dir, topic=topic, rate=rate,
                            domain_id=domain_id, node_timeout_s=node_timeout_s,
                            expected_predictions=len(direct_timeline), progress=progress)
    stamps = [_stamp(m) for m in recording.messages]
    latency_ms = np.array([
        (received - recording.published_s[s]) * 1e3 if s in recording.published_s else np.nan
        for s, received in zip(stamps, recording.received_s, strict=True)], dtype=np.float64)
    diagnostics = recording.diagnostics
    stream = {
        'published': recording.replay.published,
        'frames_in': _int(diagnostics, 'frames_in'),
        'frames_sampled': _int(diagnostics, 'frames_sampled'),
        'processed': _int(diagnostics, 'processed'),
        'dropped_by_node': _int(diagnostics, 'dropped'),
        'bad_frames': _int(diagnostics, 'bad_frames'),
        'resets': _int(diagnostics, 'resets'),
        'predictions': len(recording.messages),
        'expected_predictions': len(direct_timeline),
        'replay_wall_s': round(recording.replay.wall_s, 3),
        'rate': rate,
        'node_exit_code': recording.node_exit,
    }
    frames_in = stream['frames_in']
    stream['lost_in_transport'] = (None if frames_in is None
                                   else stream['published'] - frames_in)
    timeline = timeline_from_predictions(recording.messages, checkpoint.labels,
                                         origin_ns=direct_timeline.origin_ns,
                                         latency_ms=latency_ms,
                                         stats={'predictions': len(recording.messages)})
    direct_stamps = set(direct_timeline.stamps_ns.tolist())
    live_stamps = set(timeline.stamps_ns.tolist())
    stream['missing_predictions'] = len(direct_stamps - live_stamps)
    stream['unexpected_predictions'] = len(live_stamps - direct_stamps)
    stream['same_top1_action_as_direct'] = _agreement(timeline, direct_timeline)
    if not recording.messages:
        raise MalmmError(f'no prediction arrived on {ACTIONS_TOPIC}; the node log '
                         f'{recording.node_log} ends:\n{_log_tail(recording.node_log)}')

    samples = direct.scores.samples
    settings = {**direct.settings, 'rate': rate, 'qos': config.qos.reliability,
                'domain_id': domain_id if domain_id is not None else os.environ.get(
                    'ROS_DOMAIN_ID', '0')}
    inputs = {**direct.inputs, 'node_log': str(recording.node_log)}
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


def _stamp(message: dict[str, Any]) -> int:
    try:
        return int(message['stamp']['sec']) * 1_000_000_000 + int(message['stamp']['nanosec'])
    except (KeyError, TypeError, ValueError):
        return -1


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
