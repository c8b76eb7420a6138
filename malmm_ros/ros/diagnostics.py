"""Counters of the node and their /diagnostics message."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.clock import Clock
from rclpy.clock_type import ClockType

from malmm_ros.ros.staleness import CameraSilence, Staleness

__all__ = ['NodeStats', 'diagnostic_array', 'starved_message', 'timer_clock']


def timer_clock() -> Clock:
    """The diagnostics timer's clock: steady, because a node timer runs on the node's clock,
    which with use_sim_time stands still while /clock is paused or absent, and a node that
    stops reporting then would look dead."""
    return Clock(clock_type=ClockType.STEADY_TIME)


@dataclass
class NodeStats:
    """What /diagnostics reports; written by the callback and worker threads under `lock`."""

    frames_in: int = 0
    frames_sampled: int = 0
    processed: int = 0
    predictions: int = 0
    bad_frames: int = 0
    errors: int = 0  # unexpected failures of an inference step (logged, then skipped)
    resets: int = 0  # over the node's life (pipelines rebuilt by parameter changes included)
    memory_slots: int = 0  # after the newest step (a bank holds M + 1 slots during a step)
    last_frame_time: float | None = None  # monotonic seconds of the newest arrival
    started: float = field(default_factory=time.monotonic)
    step_ms: deque = field(default_factory=lambda: deque(maxlen=200))
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The newest frame in the monotonic and the node's ROS clock (starved or not, sim time too).
    camera: CameraSilence = field(init=False)
    _previous: tuple[float, int, int, int] | None = None  # (time, in, processed, dropped)

    def __post_init__(self) -> None:
        self.camera = CameraSilence(round(self.started * 1e9))

    def count_from_now(self) -> None:
        """Silence counts from now, in both clocks (a node that starts taking frames); call
        with `lock` held."""
        self.started, self.last_frame_time = time.monotonic(), None
        self.camera = CameraSilence(round(self.started * 1e9))

    def silence_s(self) -> float:
        """Monotonic seconds since the newest frame arrived (since start when none has);
        `camera.check` also knows sim time."""
        with self.lock:
            last = self.last_frame_time if self.last_frame_time is not None else self.started
        return time.monotonic() - last

    def rates(self, dropped: int) -> tuple[float, float, bool]:
        """(input Hz, processed Hz, dropped since last call) over the time since last call."""
        now = time.monotonic()
        previous = self._previous or (self.started, 0, 0, 0)
        self._previous = (now, self.frames_in, self.processed, dropped)
        span = max(now - previous[0], 1e-6)
        return ((self.frames_in - previous[1]) / span, (self.processed - previous[2]) / span,
                dropped > previous[3])


def diagnostic_array(stamp, *, name: str, hardware_id: str, stats: NodeStats, dropped: int,
                     backend: str, device: str, trained: bool, starved: str | None = None,
                     stamp_problem: str | None = None, extra: dict[str, Any] | None = None,
                     text: dict[str, Any] | None = None, staleness: Staleness | None = None
                     ) -> DiagnosticArray:
    """One DiagnosticStatus: ERROR (`starved`: no frames lately, the message says where the node
    listens), WARN (sim time waiting for /clock, bad stamps, dropping, untrained) or OK.

    `extra`: more values (input topic, sampling counts); `text`: the describer's counts and
    latency (text_* keys), when descriptions are on; `staleness`: the camera silence verdict
    (`clock`, `silence_s` values).
    """
    with stats.lock:
        input_hz, processed_hz, dropping = stats.rates(dropped)
        steps = np.array(stats.step_ms) if stats.step_ms else None
        values = {
            'input_rate_hz': f'{input_hz:.2f}', 'processed_rate_hz': f'{processed_hz:.2f}',
            'frames_in': stats.frames_in, 'frames_sampled': stats.frames_sampled,
            'processed': stats.processed, 'predictions': stats.predictions,
            'dropped': dropped, 'bad_frames': stats.bad_frames, 'resets': stats.resets,
            'memory_slots': stats.memory_slots, 'errors': stats.errors,
        }
    values['step_latency_p50_ms'] = f'{np.percentile(steps, 50):.2f}' if steps is not None \
        else 'n/a'
    values['step_latency_p95_ms'] = f'{np.percentile(steps, 95):.2f}' if steps is not None \
        else 'n/a'
    values.update(backend=backend, device=device, trained=trained,
                  stamp_problem=stamp_problem or 'none', **(extra or {}))
    if text is not None:
        values.update(text)
    if staleness is not None:
        values.update(staleness.values())

    if starved:
        level, message = DiagnosticStatus.ERROR, starved
    elif staleness is not None and staleness.note:
        level, message = DiagnosticStatus.WARN, f'use_sim_time is true: {staleness.note} ' \
            '(sim time has not started)'
    elif stamp_problem:
        level, message = DiagnosticStatus.WARN, stamp_problem
    elif dropping:
        level, message = DiagnosticStatus.WARN, 'dropping frames: inference slower than input'
    elif not trained:
        level, message = DiagnosticStatus.WARN, 'untrained heads: predictions are meaningless'
    elif text is not None and not text.get('text_trained', True):
        level, message = DiagnosticStatus.WARN, 'untrained text projector: descriptions are ' \
            'meaningless'
    else:
        level, message = DiagnosticStatus.OK, 'running'
    status = DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id,
                              values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])
    array = DiagnosticArray(status=[status])
    array.header.stamp = stamp
    return array


OVERLAY_SUFFIX = '/malmm/overlay'  # ours, or another camera's node's: no camera either
IMAGE_TYPES = ('sensor_msgs/Image', 'sensor_msgs/CompressedImage')


def starved_message(node: Any, input_topic: str, silence: float, *, never: bool,
                    clock: str = 'wall') -> str:
    """Where the node listens and which image topics the graph has (a wrong remap is the
    usual reason for silence); `clock` 'sim': the silence is sim time, which the message says."""
    found: dict[str, list[str]] = {kind: [] for kind in IMAGE_TYPES}
    own = {name for name, _ in node.get_publisher_names_and_types_by_node(
        node.get_name(), node.get_namespace())}  # malmm/overlay is no camera
    for name, types in node.get_topic_names_and_types():
        if name in own or name.endswith(OVERLAY_SUFFIX) or (
                name == input_topic and node.count_publishers(name) == 0):
            continue  # our output, or only our own subscription there
        for kind in types:
            short = kind.replace('/msg/', '/')
            if short in found:
                found[short].append(name)
    listing = '; '.join(f'{kind} topics: {", ".join(names) or "none"}'
                        for kind, names in found.items())
    since = ' (none since start)' if never else ''
    of_sim = ' of sim time' if clock == 'sim' else ''
    return f'no frames on {input_topic} for {silence:.1f} s{of_sim}{since}; {listing}'
