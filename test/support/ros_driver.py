"""Run malmm_anticipate as a subprocess and talk to it over real DDS from the test process.

Every session lives on a ROS domain of its own with discovery kept on this machine
(ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST), so test modules never see each other's traffic.
The driver side is a plain rclpy node in a private Context, spun by a SingleThreadedExecutor in a
background thread; rclpy's default context and signal handlers stay untouched in the test
process (which only gets ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and the project's Fast DDS
profile in its environment). Camera-sized best-effort streams come from a separate camera
process (camera_stream.py), like a real driver's. Every wait has a timeout and checks that the
node process is still alive, so a test fails with the node's stderr instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rcl_interfaces.msg import SetParametersResult
from rcl_interfaces.srv import GetParameters, SetParameters
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter, parameter_value_to_python
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

from support.child_process import WAIT_S, ChildProcess
from support.domains import ASSIGNED

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / 'config' / 'anticipate.yaml'
FASTDDS_PROFILE = ROOT / 'config' / 'fastdds.xml'
NODE_NAME = 'malmm_anticipate'
CAMERA_TOPIC = '/camera/image_raw'

RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                      reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                     reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)


def node_executable() -> str:
    """The malmm-anticipate console script of the interpreter that runs the tests."""
    candidate = Path(sys.executable).parent / 'malmm-anticipate'
    if candidate.exists():
        return str(candidate)
    return str(ROOT / '.venv' / 'bin' / 'malmm-anticipate')


def dds_profile() -> str | None:
    """The Fast DDS profile for camera-sized samples that the launch file gives the node (a
    profile the user already chose wins); every process on the camera path must use it, or
    best-effort 640x480 frames are lost in transport."""
    chosen = os.environ.get('FASTDDS_DEFAULT_PROFILES_FILE')
    if chosen:
        return chosen
    return str(FASTDDS_PROFILE) if FASTDDS_PROFILE.exists() else None


def ros_env(domain_id: int) -> dict[str, str]:
    """Environment of a process that must stay on `domain_id` and on this machine."""
    assert domain_id in ASSIGNED, f'domain {domain_id} is not in test/support/domains.py'
    env = dict(os.environ)
    env.update(ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
               PYTHONUNBUFFERED='1')
    env.pop('ROS_STATIC_PEERS', None)
    profile = dds_profile()
    if profile:
        env['FASTDDS_DEFAULT_PROFILES_FILE'] = profile
    return env


# -- the node process ------------------------------------------------------------------------


class NodeProcess(ChildProcess):
    """malmm-anticipate with config/anticipate.yaml, the camera remapped to /camera/image_raw
    (and its /compressed), `-p num_threads:=1` and extra `-p` args.

    stdout and stderr go to files (a full pipe can never block the node). Use as a context
    manager or call kill() in a finally: the process never outlives the test.
    """

    kind = 'node'
    output_name = 'stderr'

    def __init__(self, domain_id: int, params: Iterable[str] = (), *, log_dir: Path,
                 name: str = 'node', params_file: Path = CONFIG, managed: bool = False
                 ) -> None:
        self.cmd = [node_executable(), *(['--managed'] if managed else []), '--ros-args',
                    '--params-file', str(params_file),
                    '-r', f'image:={CAMERA_TOPIC}',
                    '-r', f'image/compressed:={CAMERA_TOPIC}/compressed',  # as the launch file
                    '-p', 'num_threads:=1']
        for param in params:
            self.cmd += ['-p', param]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f'{name}.stdout'
        self.stderr_path = log_dir / f'{name}.stderr'
        with open(self.stdout_path, 'wb') as out, open(self.stderr_path, 'wb') as err:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=ros_env(domain_id),
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors='replace')

    output = stderr

    def check_alive(self) -> None:
        if not self.alive:
            raise AssertionError(f'malmm_anticipate died: {self.describe()}')

    def stop(self, sig: int = signal.SIGINT, timeout: float = WAIT_S) -> int:
        """Send `sig` and return the exit status (kill and fail if it does not end)."""
        if self.alive:
            self.proc.send_signal(sig)
        return self.wait_exit(timeout)


class CameraStream:
    """camera_stream.py as a subprocess: rgb8 photos at `rate` Hz on the camera
    topic of `domain_id`, from its first matched subscriber until stop() (or `seconds`)."""

    SCRIPT = Path(__file__).with_name('camera_stream.py')

    def __init__(self, domain_id: int, *, log_dir: Path, width: int = 640, height: int = 480,
                 rate: float = 60.0, start_ns: int = 2_000_000_000_000, seconds: float = 120.0,
                 frame_id: str = 'camera_stream') -> None:
        cmd = [sys.executable, str(self.SCRIPT), '--topic', CAMERA_TOPIC, '--width', str(width),
               '--height', str(height), '--rate', str(rate), '--start-ns', str(start_ns),
               '--seconds', str(seconds), '--frame-id', frame_id]
        env = ros_env(domain_id)
        env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(ROOT), env.get('PYTHONPATH')]))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = log_dir / 'camera_stream.stderr'
        with open(self.stderr_path, 'wb') as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=err)
        self.result: dict[str, Any] | None = None

    def __enter__(self) -> CameraStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> dict[str, Any]:
        """End it (SIGINT) and return {"sent": n, "last_stamp_ns": stamp or None}."""
        if self.result is not None:
            return self.result
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=15)
        lines = out.decode(errors='replace').strip().splitlines()
        if not lines:
            raise AssertionError('camera_stream.py printed nothing; stderr:\n'
                                 + self.stderr_path.read_text(errors='replace')[-3000:])
        self.result = json.loads(lines[-1])
        return self.result


# -- waiting ---------------------------------------------------------------------------------


def wait_until(condition: Callable[[], Any], what: str, *, timeout: float = WAIT_S,
               process: NodeProcess | None = None, poll_s: float = 0.02) -> Any:
    """Poll `condition` until it returns something truthy and return that; fail at `timeout`.

    With `process`, fail at once (with its stderr) if the node exits meanwhile.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if process is not None:
            process.check_alive()
        if time.monotonic() > deadline:
            extra = f'\n{process.describe()}' if process is not None else ''
            raise AssertionError(f'timed out after {timeout} s waiting for {what}{extra}')
        time.sleep(poll_s)


class Inbox:
    """Thread-safe list of received (converted) messages."""

    def __init__(self, convert: Callable[[Any], Any] | None = None) -> None:
        self._items: list[Any] = []
        self._lock = threading.Lock()
        self._convert = convert

    def __call__(self, msg: Any) -> None:  # the subscription callback
        item = self._convert(msg) if self._convert else msg
        if item is not None:
            with self._lock:
                self._items.append(item)

    def items(self) -> list[Any]:
        with self._lock:
            return list(self._items)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# -- the driver node -------------------------------------------------------------------------


class Driver:
    """An rclpy node in a private Context on `domain_id`, spun in a background thread."""

    def __init__(self, domain_id: int, name: str = 'malmm_test_driver') -> None:
        assert domain_id in ASSIGNED, f'domain {domain_id} is not in test/support/domains.py'
        # Read by rcl_init below; every test process wants loopback-only discovery anyway, and
        # the node's DDS profile (read once per process, when the first participant is made).
        os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
        profile = dds_profile()
        if profile:
            os.environ['FASTDDS_DEFAULT_PROFILES_FILE'] = profile
        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id,
                   signal_handler_options=SignalHandlerOptions.NO)
        try:
            self.node = Node(name, context=self.context)
            self.executor = SingleThreadedExecutor(context=self.context)
            self.executor.add_node(self.node)
        except BaseException:
            rclpy.try_shutdown(context=self.context)
            raise
        self._thread = threading.Thread(target=self._spin, name=f'{name}_spin', daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def subscribe(self, msg_type: type, topic: str, qos: QoSProfile | int = RELIABLE, *,
                  convert: Callable[[Any], Any] | None = None) -> tuple[Any, Inbox]:
        inbox = Inbox(convert)
        return self.node.create_subscription(msg_type, topic, inbox, qos), inbox

    def call(self, srv_type: type, name: str, request: Any, timeout: float = WAIT_S,
             process: NodeProcess | None = None) -> Any:
        """Call a service and return its response (fails after `timeout`)."""
        client = self.node.create_client(srv_type, name)
        try:
            wait_until(lambda: client.service_is_ready(), f'service {name}', timeout=timeout,
                       process=process)
            future = client.call_async(request)
            wait_until(future.done, f'the response of {name}', timeout=timeout,
                       process=process)
            return future.result()
        finally:
            self.node.destroy_client(client)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=10.0)
        self._thread.join(timeout=10.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


# -- messages --------------------------------------------------------------------------------


def to_time(stamp_ns: int) -> Time:
    sec, nanosec = divmod(stamp_ns, 1_000_000_000)
    return Time(sec=sec, nanosec=nanosec)


def stamp_ns_of(stamp: Any) -> int:
    """Nanoseconds of a builtin_interfaces/Time or of the {sec, nanosec} JSON object."""
    if isinstance(stamp, dict):
        return stamp['sec'] * 1_000_000_000 + stamp['nanosec']
    return stamp.sec * 1_000_000_000 + stamp.nanosec


class StampClock:
    """Increasing message stamps, 0.1 s apart (never wall time: tests choose them)."""

    def __init__(self, start_s: int = 1_000, step_ns: int = 100_000_000) -> None:
        self.last_ns = start_s * 1_000_000_000 + 123_456
        self.step_ns = step_ns

    def next(self) -> int:
        self.last_ns += self.step_ns
        return self.last_ns


def raw_image(encoding: str, width: int, height: int, step: int, data: bytes, stamp_ns: int,
              frame_id: str = 'test_camera', is_bigendian: int = 0) -> Image:
    msg = Image(height=height, width=width, encoding=encoding, is_bigendian=is_bigendian,
                step=step)
    msg.data = data
    msg.header.stamp = to_time(stamp_ns)
    msg.header.frame_id = frame_id
    return msg


def compressed_image(fmt: str, data: bytes, stamp_ns: int,
                     frame_id: str = 'test_camera') -> CompressedImage:
    msg = CompressedImage(format=fmt)
    msg.data = data
    msg.header.stamp = to_time(stamp_ns)
    msg.header.frame_id = frame_id
    return msg


def level_of(status: DiagnosticStatus) -> int:
    level = status.level
    return level[0] if isinstance(level, bytes | bytearray) else int(level)


def node_diagnostics(msg: DiagnosticArray) -> dict[str, Any] | None:
    """The node's status of a /diagnostics message as a dict (None if it is someone else's)."""
    for status in msg.status:
        node = status.name.partition(':')[0]  # `malmm_anticipate`, `left/malmm_anticipate`
        if node == NODE_NAME or node.endswith(f'/{NODE_NAME}'):
            return {'level': level_of(status), 'message': status.message,
                    'name': status.name, 'hardware_id': status.hardware_id,
                    'stamp_ns': stamp_ns_of(msg.header.stamp),
                    'values': {kv.key: kv.value for kv in status.values}}
    return None


def parameter_msg(name: str, value: Any) -> Any:
    return Parameter(name, value=value).to_parameter_msg()


# -- a node and its driver ---------------------------------------------------------------------


class NodeSession:
    """One malmm_anticipate process plus a driver node on the same private domain.

    The driver subscribes to malmm/actions (JSON-decoded) and /diagnostics (the node's status as
    a dict) from the start and publishes camera frames on /camera/image_raw (raw) or
    /camera/image_raw/compressed (compressed), reliably, keeping the last `publisher_depth`
    frames for resending (a burst longer than that may lose its oldest frames).
    """

    def __init__(self, domain_id: int, params: Sequence[str], *, log_dir: Path,
                 compressed: bool = False, name: str = 'node', publisher_depth: int = 10,
                 managed: bool = False) -> None:
        self.domain_id = domain_id
        self.compressed = compressed
        params = list(params)
        if compressed:
            params.append('input_transport:=compressed')
        self.process = NodeProcess(domain_id, params, log_dir=log_dir, name=name,
                                   managed=managed)
        try:
            self.driver = Driver(domain_id)
        except BaseException:
            self.process.kill()
            raise
        self.clock = StampClock()
        node = self.driver.node
        self.actions_sub, self.actions = self.driver.subscribe(
            String, '/malmm/actions', RELIABLE, convert=lambda m: json.loads(m.data))
        self.diagnostics_sub, self.diagnostics = self.driver.subscribe(
            DiagnosticArray, '/diagnostics', RELIABLE, convert=node_diagnostics)
        if compressed:
            self.image_pub = node.create_publisher(CompressedImage, f'{CAMERA_TOPIC}/compressed',
                                                   publisher_depth)
        else:
            self.image_pub = node.create_publisher(Image, CAMERA_TOPIC, publisher_depth)

    def close(self) -> None:
        try:
            self.process.kill()
        finally:
            self.driver.close()

    # -- waiting and sending --

    def wait_until(self, condition: Callable[[], Any], what: str,
                   timeout: float = WAIT_S) -> Any:
        return wait_until(condition, what, timeout=timeout, process=self.process)

    def wait_ready(self, timeout: float = WAIT_S) -> None:
        """Until the node has subscribed to the camera and publishes predictions.

        Matching is seen from this side first; a /diagnostics message received shows that the
        node has discovered this participant too (its endpoints are announced together), so a
        first frame is not dropped by a node that does not know its publisher yet.
        """
        self.wait_until(lambda: self.image_pub.get_subscription_count() >= 1
                        and self.actions_sub.get_publisher_count() >= 1
                        and len(self.diagnostics) >= 1,
                        'malmm_anticipate to come up', timeout)

    def publish(self, msg: Any) -> None:
        self.image_pub.publish(msg)

    def roundtrip(self, build: Callable[[int], Any], found: Callable[[int], Any], what: str, *,
                  timeout: float = WAIT_S, resend_s: float = 10.0,
                  stamps: Callable[[], int] | None = None) -> tuple[int, Any]:
        """Publish build(stamp) until found(stamp) is truthy for one of the stamps sent; a
        best-effort frame lost on the way is sent again after `resend_s`. Stamps come from
        `stamps` (default: the session's increasing clock, a fresh one per send). Returns
        (stamp, found(stamp)) for the earliest stamp that came back."""
        deadline = time.monotonic() + timeout
        sent: list[int] = []
        while True:
            stamp = (stamps or self.clock.next)()
            self.publish(build(stamp))
            sent.append(stamp)
            resend_at = min(time.monotonic() + resend_s, deadline)
            while time.monotonic() < resend_at:
                for s in sent:
                    result = found(s)
                    if result:
                        return s, result
                self.process.check_alive()
                time.sleep(0.02)
            if time.monotonic() >= deadline:
                raise AssertionError(f'timed out after {timeout} s waiting for {what} '
                                     f'({len(sent)} frames sent)\n{self.process.describe()}')

    # -- predictions --

    def prediction_for(self, stamp_ns: int) -> dict[str, Any] | None:
        for prediction in self.actions.items():
            if stamp_ns_of(prediction['stamp']) == stamp_ns:
                return prediction
        return None

    def predict(self, build: Callable[[int], Any], what: str = 'a prediction', *,
                timeout: float = WAIT_S, resend_s: float = 10.0,
                stamps: Callable[[], int] | None = None) -> tuple[int, dict[str, Any]]:
        """Send a frame (again if lost) until its prediction comes back: (stamp, prediction).

        `resend_s` >= `timeout` sends exactly one frame (for a reliable camera subscription,
        where a frame is never lost and a resend would put a second one in flight).
        """
        return self.roundtrip(build, self.prediction_for, what, timeout=timeout,
                              resend_s=resend_s, stamps=stamps)

    # -- diagnostics --

    def latest_diagnostics(self) -> dict[str, Any] | None:
        items = self.diagnostics.items()
        return items[-1] if items else None

    def wait_diagnostics(self, condition: Callable[[dict[str, Any]], bool], what: str, *,
                         newer_than_ns: int = 0, timeout: float = WAIT_S) -> dict[str, Any]:
        """The first node status stamped after `newer_than_ns` that satisfies `condition`."""
        def check() -> dict[str, Any] | None:
            for status in self.diagnostics.items():
                if status['stamp_ns'] > newer_than_ns and condition(status):
                    return status
            return None
        return self.wait_until(check, what, timeout)

    def fresh_diagnostics(self, timeout: float = WAIT_S) -> dict[str, Any]:
        """A node status published after this call (it reflects everything received so far)."""
        now_ns = time.time_ns()
        return self.wait_diagnostics(lambda status: True, 'a fresh /diagnostics message',
                                     newer_than_ns=now_ns, timeout=timeout)

    # -- services and parameters --

    def reset(self) -> Any:
        return self.driver.call(Trigger, f'/{NODE_NAME}/reset', Trigger.Request(),
                                process=self.process)

    def set_parameters(self, **values: Any) -> list[SetParametersResult]:
        """Names with dots are passed as `name__sub` keyword names (model__num_heads=3)."""
        request = SetParameters.Request(parameters=[
            parameter_msg(name.replace('__', '.'), value) for name, value in values.items()])
        return list(self.driver.call(SetParameters, f'/{NODE_NAME}/set_parameters', request,
                                     process=self.process).results)

    def get_parameters(self, *names: str) -> dict[str, Any]:
        request = GetParameters.Request(names=list(names))
        response = self.driver.call(GetParameters, f'/{NODE_NAME}/get_parameters', request,
                                    process=self.process)
        return {name: parameter_value_to_python(value)
                for name, value in zip(names, response.values, strict=True)}


def running_session(domain_id: int, params: Sequence[str], *, log_dir: Path,
                    compressed: bool = False, publisher_depth: int = 10
                    ) -> Iterator[NodeSession]:
    """A ready NodeSession for a pytest fixture (`yield from`), closed whatever happens."""
    session = NodeSession(domain_id, params, log_dir=log_dir, compressed=compressed,
                          publisher_depth=publisher_depth)
    try:
        session.wait_ready()
        yield session
    finally:
        session.close()


STARTED = 'malmm-edge on'  # the node's log line once it is up (its parameters were accepted)


def startup_outcome(process: NodeProcess, timeout: float) -> tuple[int | str, str]:
    """(exit status, stderr), or ('started' | 'hung', stderr) for a process that did not exit."""
    deadline = time.monotonic() + timeout
    while process.proc.poll() is None:
        if STARTED in process.stderr():
            process.kill()
            return 'started', process.stderr()
        if time.monotonic() > deadline:
            process.kill()
            return 'hung', process.stderr()
        time.sleep(0.1)
    return process.proc.returncode, process.stderr()
