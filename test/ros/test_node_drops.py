"""A camera that outruns inference: the node keeps only the newest frame, counts the rest as
dropped in /diagnostics (and says so), and accounts for every frame it received.

640x480 rgb8 at 60 Hz from a camera process (node_helpers/camera_stream.py) into a node that
processes every frame it can (sample_fps 0, M=20) on one CPU thread: it cannot keep up, so it
must drop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticStatus
from node_helpers.frames import photo
from node_helpers.ros_driver import CameraStream, NodeSession, raw_image, running_session

DOMAIN_ID = 224
PARAMS = ['sample_fps:=0.0', 'publish_every_n:=1', 'memory_bank_length:=20']
HEIGHT, WIDTH, RATE_HZ = 480, 640, 60.0
WARN = int.from_bytes(DiagnosticStatus.WARN, 'little')


@pytest.fixture(scope='module')
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeSession]:
    yield from running_session(DOMAIN_ID, PARAMS, log_dir=tmp_path_factory.mktemp('drops_node'))


def _values(status: dict) -> dict[str, int]:
    keys = ('frames_in', 'frames_sampled', 'processed', 'dropped', 'bad_frames', 'predictions')
    return {key: int(status['values'][key]) for key in keys if key in status['values']}


def test_fast_camera_frames_are_dropped_and_counted(session: NodeSession,
                                                    tmp_path: Path) -> None:
    small = photo(120, 160, 0).tobytes()

    def small_frame(stamp: int):
        return raw_image('rgb8', 160, 120, 480, small, stamp, frame_id='slow_cam')

    session.predict(small_frame, 'a first prediction')

    def dropping(status: dict) -> bool:
        values = _values(status)
        return values['dropped'] > 0 and values['processed'] < values['frames_in']

    start_ns = time.time_ns()
    # A camera driver of its own (a separate process) at 640x480, 60 Hz.
    with CameraStream(DOMAIN_ID, log_dir=tmp_path, width=WIDTH, height=HEIGHT, rate=RATE_HZ,
                      start_ns=session.clock.next(), frame_id='fast_cam') as camera:
        status = session.wait_diagnostics(dropping, 'dropped > 0 and processed < frames_in',
                                          newer_than_ns=start_ns)
        # A status published while dropping says so (WARN, 'dropping frames').
        session.wait_diagnostics(lambda d: d['level'] == WARN and 'dropping' in d['message'],
                                 'a WARN status saying frames are dropped',
                                 newer_than_ns=start_ns)
        result = camera.stop()
    session.clock.last_ns = max(session.clock.last_ns, result['last_stamp_ns'] or 0)
    values = _values(status)
    assert values['dropped'] > 0
    assert values['processed'] < values['frames_in']
    assert values['frames_in'] <= result['sent'] + len(session.actions)
    assert session.process.alive

    # Once the camera stops, every received frame is accounted for: processed or dropped.
    def accounted(status: dict) -> bool:
        v = _values(status)
        return (v['frames_in'] >= values['frames_in']
                and v['frames_in'] == v['processed'] + v['dropped'] + v['bad_frames'])

    settled = session.wait_diagnostics(
        accounted, 'frames_in == processed + dropped + bad_frames after the stream stopped')
    settled_values = _values(settled)
    assert settled_values['bad_frames'] == 0
    assert settled_values['predictions'] == settled_values['processed']  # publish_every_n 1
    assert settled_values['dropped'] >= values['dropped']
    assert any(p['frame_id'] == 'fast_cam' for p in session.actions.items())

    # And it answers right away once the load is gone.
    _, prediction = session.predict(small_frame, 'a prediction after the stream')
    assert prediction['frame_id'] == 'slow_cam'


def test_no_drops_counted_for_a_camera_the_node_keeps_up_with(session: NodeSession) -> None:
    """One frame at a time (each waits for its prediction): nothing is dropped."""
    before = _values(session.fresh_diagnostics())
    for i in range(5):
        session.predict(lambda stamp, i=i: raw_image(
            'rgb8', 160, 120, 480, np.ascontiguousarray(photo(120, 160, i)).tobytes(), stamp))
    after = _values(session.fresh_diagnostics())
    assert after['dropped'] == before['dropped']
    assert after['processed'] - before['processed'] >= 5
