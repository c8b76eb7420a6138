"""SIGINT and SIGTERM end malmm_anticipate with exit status 0 and no traceback: when idle, and
while a camera process streams frames in (the worker thread busy when the signal lands).

Each test starts its own node process; one driver node serves them all on this module's domain.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sensor_msgs.msg import Image
from std_msgs.msg import String

from support.domains import domain_id
from support.frames import photo
from support.ros_driver import (
    CAMERA_TOPIC,
    RELIABLE,
    WAIT_S,
    CameraStream,
    Driver,
    Inbox,
    NodeProcess,
    StampClock,
    raw_image,
    stamp_ns_of,
    wait_until,
)

DOMAIN_ID = domain_id(__file__)
PARAMS = ['sample_fps:=0.0', 'publish_every_n:=1', 'memory_bank_length:=8']
HEIGHT, WIDTH = 240, 320
SIGNALS = [signal.SIGINT, signal.SIGTERM]


class Link:
    """The driver side of this module: a camera publisher and inboxes for the outputs."""

    def __init__(self) -> None:
        self.driver = Driver(DOMAIN_ID, 'malmm_termination_driver')
        node = self.driver.node
        self.camera = node.create_publisher(Image, CAMERA_TOPIC, 10)
        self.actions = Inbox(lambda m: stamp_ns_of(json.loads(m.data)['stamp']))
        node.create_subscription(String, '/malmm/actions', self.actions, RELIABLE)
        # Someone watches the overlay, so the worker draws and publishes it too.
        self.overlay = Inbox(lambda m: stamp_ns_of(m.header.stamp))
        node.create_subscription(Image, '/malmm/overlay', self.overlay, RELIABLE)
        self.clock = StampClock()
        self.frames = [photo(HEIGHT, WIDTH, i).tobytes() for i in range(4)]

    def frame(self, i: int) -> Image:
        return raw_image('rgb8', WIDTH, HEIGHT, WIDTH * 3, self.frames[i % 4], self.clock.next())

    def start_node(self, log_dir: Path, name: str) -> NodeProcess:
        """A fresh node that has processed a frame and is now idle: the overlay (published last
        in the worker's step) of the newest frame sent has arrived."""
        process = NodeProcess(DOMAIN_ID, PARAMS, log_dir=log_dir, name=name)
        try:
            wait_until(lambda: self.camera.get_subscription_count() >= 1, 'the node to come up',
                       process=process)
            deadline = time.monotonic() + WAIT_S
            for i in range(10**6):
                msg = self.frame(i)
                stamp = stamp_ns_of(msg.header.stamp)
                self.camera.publish(msg)
                until = min(time.monotonic() + 2.0, deadline)
                while time.monotonic() < until and stamp not in self.overlay.items():
                    process.check_alive()
                    time.sleep(0.02)
                if stamp in self.overlay.items():
                    break
                assert time.monotonic() < deadline, f'no overlay\n{process.describe()}'
            assert stamp in self.actions.items()
        except BaseException:
            process.kill()
            raise
        return process

    def wait_gone(self) -> None:
        wait_until(lambda: self.camera.get_subscription_count() == 0,
                   'the old node to leave the graph')


@pytest.fixture(scope='module')
def link() -> Iterator[Link]:
    link = Link()
    try:
        yield link
    finally:
        link.driver.close()


def _check_clean_exit(process: NodeProcess, returncode: int, sig: int) -> None:
    stderr = process.stderr()
    assert returncode == 0, f'{signal.Signals(sig).name}: exit status {returncode}\n{stderr}'
    assert 'Traceback' not in stderr, stderr[-4000:]
    assert 'Exception in thread' not in stderr, stderr[-4000:]


@pytest.mark.parametrize('sig', SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_signal_when_idle_exits_0_without_traceback(link: Link, tmp_path: Path,
                                                     sig: int) -> None:
    with link.start_node(tmp_path, 'idle') as process:
        # Idle: the last frame's prediction is in and nothing else is on the way.
        returncode = process.stop(sig)
    _check_clean_exit(process, returncode, sig)
    link.wait_gone()


# Regression: a signal that lands mid-step must not print a traceback from the worker
# publishing on a context that is already shut down.
@pytest.mark.parametrize('sig', SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_signal_while_streaming_exits_0_without_traceback(link: Link, tmp_path: Path,
                                                          sig: int) -> None:
    # A camera process at 640x480, 60 Hz: faster than the node, so its worker is never idle.
    with link.start_node(tmp_path, 'streaming') as process, CameraStream(
            DOMAIN_ID, log_dir=tmp_path, start_ns=link.clock.next()) as camera:
        before = len(link.actions)
        wait_until(lambda: len(link.actions) >= before + 5, 'predictions while streaming',
                   process=process)
        returncode = process.stop(sig)
        assert camera.stop()['sent'] > 0
    _check_clean_exit(process, returncode, sig)
    link.wait_gone()
