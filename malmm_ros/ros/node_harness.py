"""malmm-anticipate as a child process, watched over ROS 2: the demo's, the live evaluation's and
bench/node_bench.py's one way to start, wait for, record and stop the node.

The node's output goes to a log file (a full pipe could block it). The watcher is an rclpy node
in a private context, without signal handlers, spun in a background thread: it records every
/malmm/actions message with its receive time and the node's latest /diagnostics values, and
callers add their own publishers and subscriptions to it. Waits fail early, with the log's tail,
when the node dies. Stopping is SIGINT (the node's clean shutdown), then kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from std_msgs.msg import String

from malmm_ros.errors import FrameError, MalmmError
from malmm_ros.ros.dds_profile import PROFILE_VARIABLE, package_profile
from malmm_ros.stamps import stamp_ns

__all__ = ['ACTIONS_TOPIC', 'NODE_NAME', 'NodeHarness', 'NodeRecord', 'local_ros_environment',
           'log_tail', 'node_command', 'stop_process']

NODE_NAME = 'malmm_anticipate'
ACTIONS_TOPIC = '/malmm/actions'
_POLL_S = 0.02
_SETTLE_S = 2.0  # no new prediction for this long: the node is done
_MAX_SETTLE_S = 60.0
_DIAGNOSTICS_WAIT_S = 3.0  # the node sends diagnostics once a second
# Reliable with a deep queue: every prediction is kept.
_ACTIONS_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000,
                          reliability=ReliabilityPolicy.RELIABLE)


def node_command(params_file: str | os.PathLike, *, remaps: Iterable[str] = (),
                 params: Iterable[str] = ()) -> list[str]:
    """The node's command line: this interpreter, a parameter file, `-r` remaps and `-p`
    parameters (NAME:=VALUE)."""
    command = [sys.executable, '-m', 'malmm_ros.ros.anticipate_main', '--ros-args',
               '--params-file', str(params_file)]
    for remap in remaps:
        command += ['-r', remap]
    for param in params:
        command += ['-p', param]
    return command


def local_ros_environment(domain_id: int | None) -> dict[str, str | None]:
    """Environment changes that keep DDS discovery on this machine (None: remove the variable),
    with the package's Fast DDS profile unless one is set, and `domain_id` if given."""
    profile = os.environ.get(PROFILE_VARIABLE) or package_profile()
    values: dict[str, str | None] = {'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST',
                                     'ROS_STATIC_PEERS': None,
                                     PROFILE_VARIABLE: str(profile) if profile else None}
    if domain_id is not None:
        values['ROS_DOMAIN_ID'] = str(domain_id)
    return values


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGINT (the node's and the replay's clean shutdown), then kill if it does not end;
    returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


def log_tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.is_file():
        return ''
    text = path.read_text(errors='replace').strip().splitlines()
    return '\n'.join(text[-lines:])


@dataclass
class NodeRecord:
    """What the watcher saw of the node: its predictions and its latest diagnostics."""

    messages: list[dict[str, Any]] = field(default_factory=list)  # decoded /malmm/actions
    received_s: list[float] = field(default_factory=list)  # monotonic, per message
    diagnostics: dict[str, str] = field(default_factory=dict)  # the node's latest values
    diagnostics_s: float = 0.0  # monotonic receive time of those values

    def end_to_end_ms(self, sent_s: Mapping[int, float]) -> np.ndarray:
        """Per message: ms from when its frame was sent (`sent_s`: stamp ns -> monotonic s) to
        its receipt; NaN where the frame is not in `sent_s`."""
        latency = []
        for message, received in zip(self.messages, self.received_s, strict=True):
            sent = sent_s.get(_stamp_ns(message))
            latency.append(np.nan if sent is None else (received - sent) * 1e3)
        return np.asarray(latency, dtype=np.float64)


def _stamp_ns(message: Mapping[str, Any]) -> int | None:
    try:
        return stamp_ns(message['stamp'])
    except (KeyError, TypeError, FrameError):
        return None


class NodeHarness:
    """The node process and its watcher; a context manager (leaving it stops both).

    `environment` is applied to os.environ while the harness lives (the node inherits it and
    the watcher's DDS reads it); `record` receives what the watcher sees.
    """

    def __init__(self, command: list[str], *, log: str | os.PathLike, watcher: str,
                 domain_id: int | None = None,
                 environment: Mapping[str, str | None] | None = None,
                 record: NodeRecord | None = None) -> None:
        self.command = command
        self.log_path = Path(log)
        self.record = NodeRecord() if record is None else record
        self.exit_code: int | None = None
        self._watcher_name = watcher
        self._domain_id = domain_id
        self._environment = dict(environment or {})
        self._saved_environment: dict[str, str | None] = {}
        self._lock = threading.Lock()
        self.log: BinaryIO | None = None  # open while running; other children may share it
        self.process: subprocess.Popen | None = None
        self.context = Context()
        self.node: Node | None = None
        self._executor: SingleThreadedExecutor | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> NodeHarness:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        self._saved_environment = {key: os.environ.get(key) for key in self._environment}
        _set_environment(self._environment)
        self.log = open(self.log_path, 'wb')  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        # args=[]: the watcher's command line belongs to its tool (malmm-demo, malmm-eval, a
        # bench), not to ROS; rcl would read `name:=value` options there as remap rules.
        rclpy.init(args=[], context=self.context, domain_id=self._domain_id,
                   signal_handler_options=SignalHandlerOptions.NO)
        self.node = Node(self._watcher_name, context=self.context)
        self.node.create_subscription(String, ACTIONS_TOPIC, self.actions_callback,
                                      _ACTIONS_QOS)
        self.node.create_subscription(DiagnosticArray, '/diagnostics',
                                      self.diagnostics_callback, 10)
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, name=f'{self._watcher_name}_spin',
                                        daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            self._executor.spin()
        except ExternalShutdownException:
            pass

    def close(self) -> None:
        """Stop the node (its exit code goes to `exit_code`), then the watcher; restore the
        environment."""
        try:
            if self.process is not None:
                self.exit_code = stop_process(self.process)
        finally:
            if self._executor is not None:
                self._executor.shutdown(timeout_sec=5.0)
            if self._thread is not None:
                self._thread.join(timeout=5.0)
            if self.node is not None:
                self.node.destroy_node()
            rclpy.try_shutdown(context=self.context)
            if self.log is not None:
                self.log.close()
            _set_environment(self._saved_environment)

    def actions_callback(self, msg: String) -> None:
        now = time.monotonic()
        try:
            message = json.loads(msg.data)
        except json.JSONDecodeError:
            return  # not ours; the live evaluation's schema check reports foreign messages
        with self._lock:
            self.record.messages.append(message)
            self.record.received_s.append(now)

    def diagnostics_callback(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith(NODE_NAME):
                with self._lock:
                    self.record.diagnostics = {kv.key: kv.value for kv in status.values}
                    self.record.diagnostics_s = time.monotonic()

    def count(self) -> int:
        """Predictions received so far."""
        with self._lock:
            return len(self.record.messages)

    def latest(self) -> dict[str, Any] | None:
        with self._lock:
            return self.record.messages[-1] if self.record.messages else None

    def _check_alive(self, until: str) -> None:
        """MalmmError with the log's tail if the node has exited (waiting `until` what)."""
        if self.process is not None and self.process.poll() is not None:
            raise MalmmError(f'the node exited with code {self.process.returncode} while '
                             f'waiting until {until}; its log {self.log_path} ends:\n'
                             f'{log_tail(self.log_path)}')

    def wait_until(self, condition: Callable[[], bool], timeout: float, until: str) -> None:
        """Poll `condition` (`until` says it in words) until true; MalmmError if the node dies
        or `timeout` s pass."""
        deadline = time.monotonic() + timeout
        while not condition():
            self._check_alive(until)
            if time.monotonic() > deadline:
                raise MalmmError(f'timed out after {timeout:.0f} s waiting until {until}; the '
                                 f'node log {self.log_path} ends:\n{log_tail(self.log_path)}')
            time.sleep(_POLL_S)

    def settle(self, expected: int | None = None) -> None:
        """Wait for the last predictions (none new for _SETTLE_S, or `expected` of them in
        all), then for diagnostics sent after them."""
        began = changed = time.monotonic()
        count = self.count()
        while time.monotonic() - changed < _SETTLE_S and time.monotonic() - began < _MAX_SETTLE_S:
            if expected is not None and count >= expected:
                break
            self._check_alive('its last predictions arrive')
            time.sleep(_POLL_S)
            if self.count() != count:
                count, changed = self.count(), time.monotonic()
        last = time.monotonic()
        deadline = last + _DIAGNOSTICS_WAIT_S
        while time.monotonic() < deadline:
            with self._lock:
                if self.record.diagnostics_s > last:
                    return
            time.sleep(_POLL_S)


def _set_environment(values: Mapping[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
