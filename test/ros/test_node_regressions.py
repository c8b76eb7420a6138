"""Node bugs found by these integration tests, reproduced over DDS; they fail until fixed.

Kept in the module that sorts last so that `pytest -x test/ros/test_node_*.py` runs every other
test first (the SIGINT/SIGTERM-while-streaming bug tests are the last tests of
test_node_termination.py for the same reason). Line numbers in the BUG notes are those of
commit 3164784.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import cv2
import numpy as np
import pytest

from support.domains import domain_ids
from support.frames import photo
from support.ros_driver import (
    WAIT_S,
    NodeSession,
    compressed_image,
    raw_image,
    running_session,
)

DOMAIN_ID, RAW_DOMAIN_ID = domain_ids(__file__)  # the compressed node, the raw node
HEIGHT, WIDTH = 240, 320
PARAMS = ['sample_fps:=0.0', 'publish_every_n:=1', 'memory_bank_length:=8']


@pytest.fixture(scope='module')
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeSession]:
    yield from running_session(DOMAIN_ID, PARAMS, log_dir=tmp_path_factory.mktemp('bugs_node'),
                               compressed=True)


def _jpeg_with_corrupt_scan() -> bytes:
    """A valid 320x240 JPEG with an end-of-image marker (FF D9) written over its entropy-coded
    data a third of the way in: headers intact, the scan cut short (what a frame damaged in
    transit looks like). libjpeg decodes it with the warning "Corrupt JPEG data: premature end
    of data segment" and fills the rest of the picture with grey."""
    ok, buffer = cv2.imencode('.jpg', np.ascontiguousarray(photo(HEIGHT, WIDTH, 4)[..., ::-1]),
                              [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    data = bytearray(buffer.tobytes())
    scan = data.index(b'\xff\xda')
    start = scan + (len(data) - scan) // 3
    data[start:start + 2] = b'\xff\xd9'
    return bytes(data)


# Regression: a JPEG with corrupt scan data (libjpeg only warns) must count as a bad frame,
# never be decoded half-grey and predicted on.
def test_jpeg_with_corrupt_scan_data_is_a_bad_frame(compressed: NodeSession) -> None:
    good = photo(HEIGHT // 2, WIDTH // 2, 1)
    ok, buffer = cv2.imencode('.jpg', np.ascontiguousarray(good[..., ::-1]))
    assert ok
    compressed.predict(lambda s: compressed_image('jpeg', buffer.tobytes(), s),
                       'a good frame first')
    before = int(compressed.fresh_diagnostics()['values']['bad_frames'])
    data = _jpeg_with_corrupt_scan()

    def outcome(stamp: int) -> str | None:
        if compressed.prediction_for(stamp):
            return 'processed as a good frame (a prediction came back for it)'
        if any(int(d['values']['bad_frames']) > before for d in compressed.diagnostics.items()):
            return 'counted as bad'
        return None

    _, result = compressed.roundtrip(lambda s: compressed_image('jpeg', data, s), outcome,
                                     'the corrupt JPEG to be handled')
    assert result == 'counted as bad', f'a JPEG with corrupt scan data was {result}'


@pytest.fixture(scope='module')
def raw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeSession]:
    yield from running_session(RAW_DOMAIN_ID, ['sample_fps:=0.0', 'memory_bank_length:=2'],
                               log_dir=tmp_path_factory.mktemp('bugs_raw_node'))


# Regression: /diagnostics must never report more than M memory slots (a bank holds M + 1
# during a step; the worker now records the count after each step).
def test_diagnostics_never_report_more_memory_slots_than_m(raw: NodeSession) -> None:
    rgb = photo(HEIGHT, WIDTH, 0).tobytes()
    raw.predict(lambda s: raw_image('rgb8', WIDTH, HEIGHT, WIDTH * 3, rgb, s))
    start_ns = time.time_ns()
    deadline = time.monotonic() + WAIT_S
    statuses: list[dict] = []
    # Frames faster than the node steps (the worker is never idle) until 12 statuses are in.
    while len(statuses) < 12 and time.monotonic() < deadline:
        raw.process.check_alive()
        raw.publish(raw_image('rgb8', WIDTH, HEIGHT, WIDTH * 3, rgb, raw.clock.next()))
        time.sleep(1 / 60)
        statuses = [d for d in raw.diagnostics.items() if d['stamp_ns'] > start_ns]
        if any(int(d['values']['memory_slots']) > 2 for d in statuses):
            break
    assert statuses, 'no /diagnostics while streaming'
    slots = [int(d['values']['memory_slots']) for d in statuses]
    assert max(slots) <= 2, f'memory_slots reported with memory_bank_length 2: {slots}'


# Regression: use_sim_time and other parameters outside the config schema must be settable
# at run time.
def test_use_sim_time_can_be_set_at_run_time(raw: NodeSession) -> None:
    [result] = raw.set_parameters(use_sim_time=True)
    try:
        assert result.successful is True, result.reason
        assert raw.get_parameters('use_sim_time') == {'use_sim_time': True}
    finally:
        raw.set_parameters(use_sim_time=False)


# Regression: the resets counter counts over the node's life, across pipeline rebuilds.
def test_resets_counter_survives_a_pipeline_rebuild(raw: NodeSession) -> None:
    rgb = photo(HEIGHT // 2, WIDTH // 2, 2).tobytes()

    def frame(stamp: int):
        return raw_image('rgb8', WIDTH // 2, HEIGHT // 2, WIDTH // 2 * 3, rgb, stamp)

    raw.predict(frame)
    back = raw.clock.last_ns - 10**9 - 777  # off the clock's grid: never sent before
    _, prediction = raw.predict(frame, 'a prediction for an older stamp', stamps=lambda: back)
    assert prediction['frames_seen'] == 1
    resets = int(raw.wait_diagnostics(lambda d: int(d['values']['resets']) >= 1,
                                      'resets >= 1')['values']['resets'])
    [result] = raw.set_parameters(memory_bank_length=3)
    try:
        assert result.successful is True, result.reason
        raw.predict(frame, 'a prediction from the rebuilt pipeline')
        status = raw.fresh_diagnostics()
        assert int(status['values']['resets']) >= resets, (
            f'resets went from {resets} to {status["values"]["resets"]}')
    finally:
        raw.set_parameters(memory_bank_length=2)
