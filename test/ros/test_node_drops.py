"""Frames that arrive while inference is busy: the node keeps only the newest, counts the rest as
dropped in /diagnostics (and says so), never queues them, and accounts for every frame.

Counts, not speed: the driver publishes bursts of frames back to back over a reliable
subscription deep enough to hold a whole burst (qos.depth 100), so every frame reaches the
node's image callback, which only hands it to the keep-latest slot. The worker takes one frame
and spends a whole inference step on it (encoder, memory, heads) while the callbacks of the
frames behind it run in a fraction of that, so those frames replace one another in the slot.
No camera process and no rate is involved, so a loaded machine slows both sides alike; the test
sends further bursts until it sees a drop (a node that queues never drops and fails it). How
many frames a real 30-60 Hz camera loses is measured by bench/node_bench.py ("dropped").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticStatus
from sensor_msgs.msg import Image

from support.domains import domain_id
from support.frames import photo
from support.ros_driver import (
    WAIT_S,
    NodeSession,
    raw_image,
    running_session,
    stamp_ns_of,
)

DOMAIN_ID = domain_id(__file__)
BURST = 30  # frames per burst; qos.depth and the driver's publisher keep them all
MAX_BURSTS = 10  # the first burst drops frames in practice; a queueing node never does
# Reliable and deep: DDS delivers every frame to the callback (the slot alone drops). No
# staleness ERROR between bursts: a WARN for drops must not depend on how soon it is published.
PARAMS = ['sample_fps:=0.0', 'publish_every_n:=1', 'memory_bank_length:=20',
          'qos.reliability:=reliable', 'qos.depth:=100', 'stale_after_s:=3600.0']
HEIGHT, WIDTH = 120, 160
WARN = int.from_bytes(DiagnosticStatus.WARN, 'little')
COUNTERS = ('frames_in', 'frames_sampled', 'processed', 'dropped', 'bad_frames', 'errors',
            'predictions')


@pytest.fixture(scope='module')
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeSession]:
    yield from running_session(DOMAIN_ID, PARAMS, log_dir=tmp_path_factory.mktemp('drops_node'),
                               publisher_depth=BURST)


def _values(status: dict) -> dict[str, int]:
    return {key: int(status['values'][key]) for key in COUNTERS}


def _frame(index: int, frame_id: str) -> Callable[[int], Image]:
    data = np.ascontiguousarray(photo(HEIGHT, WIDTH, index)).tobytes()
    return lambda stamp: raw_image('rgb8', WIDTH, HEIGHT, WIDTH * 3, data, stamp,
                                   frame_id=frame_id)


def _predict_one(session: NodeSession, build: Callable[[int], Image]) -> int:
    """Send one frame and wait for its prediction (reliable input: never a second frame)."""
    stamp, _ = session.predict(build, resend_s=WAIT_S)
    return stamp


def _settled(session: NodeSession, frames_in: int) -> dict[str, int]:
    """Counters of a status published after this call, once `frames_in` frames were received
    and each one was processed, dropped or refused (the slot empty, the worker idle, every
    prediction published)."""
    now_ns = time.time_ns()

    def done(status: dict) -> bool:
        v = _values(status)
        return (v['frames_in'] >= frames_in and v['frames_sampled'] == v['frames_in']
                and v['frames_sampled'] == (v['processed'] + v['dropped'] + v['bad_frames']
                                            + v['errors'])
                and v['predictions'] == v['processed'])
    return _values(session.wait_diagnostics(
        done, f'frames_in >= {frames_in}, each processed, dropped or refused',
        newer_than_ns=now_ns))


def test_frames_arriving_while_inference_is_busy_are_dropped_and_counted(
        session: NodeSession) -> None:
    _predict_one(session, _frame(0, 'warmup'))
    before = _settled(session, 0)
    start_ns = time.time_ns()
    build = _frame(1, 'burst')
    bursts: list[list[int]] = []
    after = before
    while len(bursts) < MAX_BURSTS and after['dropped'] == before['dropped']:
        stamps = [session.clock.next() for _ in range(BURST)]
        for stamp in stamps:  # back to back: no pause, no waiting for predictions
            session.publish(build(stamp))
        bursts.append(stamps)
        sent = sum(len(b) for b in bursts)
        after = _settled(session, before['frames_in'] + sent)
        # The newest frame of a burst is never dropped: nothing came to replace it.
        session.wait_until(lambda s=stamps[-1]: session.prediction_for(s),
                           'the prediction of the last frame of the burst')
    delta = {key: after[key] - before[key] for key in COUNTERS}
    summary = f'{len(bursts)} bursts of {BURST}: {delta}'

    assert delta['dropped'] > 0, f'no frame dropped, so frames were queued: {summary}'
    assert delta['frames_in'] == sent, summary  # reliable and deep: DDS lost none
    assert delta['processed'] + delta['dropped'] == sent, summary
    assert delta['bad_frames'] == 0 and delta['errors'] == 0, summary
    # Processed frames, and only those, got a prediction, in stamp order: the slot never hands
    # the worker a frame older than one it already had.
    sent_stamps = {stamp for burst in bursts for stamp in burst}
    predicted = [p for p in session.actions.items() if p['frame_id'] == 'burst']
    stamps = [stamp_ns_of(p['stamp']) for p in predicted]
    assert set(stamps) <= sent_stamps
    assert len(stamps) == delta['processed'] == delta['predictions'], summary
    assert stamps == sorted(set(stamps)), 'predictions out of stamp order'
    assert all(burst[-1] in stamps for burst in bursts)

    # A status published after the drops says so: WARN, 'dropping frames'.
    status = session.wait_diagnostics(lambda d: d['level'] == WARN and 'dropping' in d['message'],
                                      'a WARN status saying frames are dropped',
                                      newer_than_ns=start_ns)
    assert int(status['values']['dropped']) > before['dropped']
    assert session.process.alive

    # And a frame sent on its own afterwards is processed, not dropped.
    dropped = after['dropped']
    _predict_one(session, _frame(2, 'after_burst'))
    assert _settled(session, after['frames_in'] + 1)['dropped'] == dropped


def test_no_drops_counted_for_a_camera_the_node_keeps_up_with(session: NodeSession) -> None:
    """One frame at a time (each waits for its prediction): nothing is dropped."""
    before = _settled(session, 0)
    for i in range(5):
        _predict_one(session, _frame(i, 'one_by_one'))
    after = _settled(session, before['frames_in'] + 5)
    assert after['frames_in'] - before['frames_in'] == 5
    assert after['dropped'] == before['dropped']
    assert after['processed'] - before['processed'] == 5
