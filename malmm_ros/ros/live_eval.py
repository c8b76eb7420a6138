"""malmm-eval --live: the node in its own process, the bag replayed into it over ROS 2.

The node (malmm_anticipate) runs as a separate process (malmm_ros.ros.node_harness) with the
evaluation's config written as a parameter file (checkpoint, sampling and memory as in direct
mode; text descriptions off), the project's Fast DDS profile and discovery kept on this
machine. This process replays the bag with its original timing (malmm_ros.ros.replay.replay,
raw CDR bytes untouched) and records every /malmm/actions message with its receive time and the
latest /diagnostics of the node; malmm_ros.evaluation.live scores them.

End-to-end latency: from publishing a frame (monotonic clock, this process) to receiving the
prediction stamped with it (same clock).
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rclpy.publisher import Publisher
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from malmm_ros.config import AnticipateConfig
from malmm_ros.data.bags import COMPRESSED_IMAGE_TYPE, bag_info, image_topics
from malmm_ros.errors import DataError, FrameError, MalmmError
from malmm_ros.evaluation import AnnotationContext, Checkpoint, Evaluation, Timeline
from malmm_ros.evaluation.live import score_live
from malmm_ros.ros.node_harness import (
    ACTIONS_TOPIC,
    NodeHarness,
    NodeRecord,
    local_ros_environment,
    log_tail,
    node_command,
)
from malmm_ros.ros.replay import ReplayStats, replay
from malmm_ros.stamps import stamp_ns

__all__ = ['LiveRecording', 'evaluate_live', 'record_live']

_MATCH_GRACE_S = 1.0
# Reliable with a deep queue: the camera side must not lose frames before the node's own
# (best-effort, depth-1) subscription decides.
_CAMERA_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                         reliability=ReliabilityPolicy.RELIABLE)


@dataclass
class LiveRecording(NodeRecord):
    """What one live run saw: predictions with receive times, frames with publish times."""

    published_s: dict[int, float] = field(default_factory=dict)  # frame stamp -> monotonic
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
    try:
        return stamp_ns({'sec': sec, 'nanosec': nanosec})
    except FrameError:
        return None


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


def _write_params(path: Path, config: AnticipateConfig, transport: str) -> Path:
    parameters = config.replace(input_transport=transport).to_dict()
    if parameters['checkpoint']:  # empty: untrained heads, not the current folder
        parameters['checkpoint'] = str(Path(parameters['checkpoint']).resolve())
    path.write_text(yaml.safe_dump({'/**': {'ros__parameters': parameters}}, sort_keys=False))
    return path


def _camera_topic(bag: Path, topic: str | None) -> tuple[str, bool]:
    """The bag's image topic to replay (the only one unless `topic` chooses) and whether it
    is compressed."""
    topics = image_topics(bag)
    if topic is None:
        if len(topics) != 1:
            what = 'no image topic' if not topics else f'several image topics {sorted(topics)}'
            raise DataError(f'{bag} has {what}; choose one with --topic')
        topic = next(iter(topics))
    elif topic not in topics:
        raise DataError(f'{bag} has no image topic {topic!r}; its image topics are '
                        f'{sorted(topics)}')
    return topic, topics[topic] == COMPRESSED_IMAGE_TYPE


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
    topic, compressed = _camera_topic(bag, topic)
    params = _write_params(out_dir / 'node_params.yaml', config,
                           'compressed' if compressed else 'raw')
    remap = f'image/compressed:={topic}' if compressed else f'image:={topic}'
    recording = LiveRecording(node_log=out_dir / 'node.log')
    total = bag_info(bag)['topics'][topic]['count']
    harness = NodeHarness(node_command(params, remaps=[remap]), log=recording.node_log,
                          watcher='malmm_eval_live', domain_id=domain_id,
                          environment=local_ros_environment(domain_id), record=recording)
    with harness:
        publisher = harness.node.create_publisher(CompressedImage if compressed else Image,
                                                  topic, _CAMERA_QOS)
        harness.wait_until(lambda: publisher.get_subscription_count() >= 1
                           and harness.node.count_publishers(ACTIONS_TOPIC) >= 1,
                           node_timeout_s, f'the node subscribes to {topic}')
        # Our writer has matched the node's reader; give the node's side of discovery time to
        # match ours too, or its best-effort reader drops the first frames (and its sampling
        # grid starts on a later one).
        time.sleep(_MATCH_GRACE_S)
        quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(
            io.StringIO())  # replay() always draws a progress bar on sys.stderr
        with quiet:
            recording.replay = replay(bag, {topic: _TimedPublisher(publisher, recording)},
                                      rate=rate, ok=harness.context.ok, progress_total=total)
        harness.settle(expected_predictions)
    recording.node_exit = harness.exit_code
    return recording


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
    if not recording.messages:
        raise MalmmError(f'no prediction arrived on {ACTIONS_TOPIC}; the node log '
                         f'{recording.node_log} ends:\n{log_tail(recording.node_log)}')
    return score_live(recording, recording.end_to_end_ms(recording.published_s), checkpoint,
                      context, config, direct, direct_timeline, rate=rate, domain_id=domain_id,
                      began=began)
