"""Raw sensor_msgs/Image in, over DDS: every encoding decodes to the pixels that were sent, and
every kind of bad frame is counted and skipped while the node keeps predicting.

One malmm_anticipate process serves the module (sample_fps 0: every frame is processed). Pixels
are checked on malmm/overlay, the decoded frame re-encoded as bgr8 with a darkened text band at
the top: the bottom half of a 240x320 frame is far below that band and must equal what the
test expects for the sent bytes (its own reference conversion, see node_helpers/frames.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from sensor_msgs.msg import Image

from support.domains import domain_id
from support.frames import BYTES_PER_PIXEL, UYVY, YUYV, overlay_rgb, pack_raw, photo
from support.ros_driver import RELIABLE, NodeSession, raw_image, running_session, stamp_ns_of

DOMAIN_ID = domain_id(__file__)
HEIGHT, WIDTH = 240, 320
PARAMS = ['sample_fps:=0.0', 'publish_every_n:=1', 'memory_bank_length:=8',
          'qos.reliability:=reliable', 'qos.depth:=2']


@pytest.fixture(scope='module')
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeSession]:
    yield from running_session(DOMAIN_ID, PARAMS, log_dir=tmp_path_factory.mktemp('raw_node'))


@pytest.fixture(scope='module')
def overlay(session: NodeSession) -> Iterator:
    """A subscription to malmm/overlay for the pixel checks (the node draws only when one
    exists)."""
    subscription, inbox = session.driver.subscribe(Image, '/malmm/overlay', RELIABLE)
    try:
        yield inbox
    finally:
        session.driver.node.destroy_subscription(subscription)


def _good_frame(index: int = 0):
    rgb = photo(HEIGHT // 2, WIDTH // 2, index)
    return lambda stamp: raw_image('rgb8', rgb.shape[1], rgb.shape[0], rgb.shape[1] * 3,
                                   rgb.tobytes(), stamp)


# encoding, bytes of padding after each row, big-endian (mono16 only)
CASES = [
    ('rgb8', 0, False),
    ('rgb8', 7, False),
    ('bgr8', 4, False),
    ('rgba8', 0, False),
    ('rgba8', 12, False),
    ('bgra8', 8, False),
    ('mono8', 3, False),
    ('mono16', 0, False),
    ('mono16', 6, False),
    ('mono16', 0, True),
    ('mono16', 10, True),
    ('mono16', 5, False),  # an odd step: 16-bit rows that start at odd addresses
    ('mono16', 5, True),
    ('yuv422', 4, False),
    ('uyvy', 0, False),
    ('yuv422_yuy2', 4, False),
    ('yuyv', 0, False),
]
# Largest per-channel difference allowed: exact for every 8- and 16-bit RGB/mono layout; YUV is
# converted with fixed-point BT.601 coefficients by the node, in floating point here.
YUV_TOLERANCE = 2


@pytest.mark.parametrize(('encoding', 'pad', 'bigendian'), CASES,
                         ids=[f'{e}-pad{p}{"-be" if b else ""}' for e, p, b in CASES])
def test_raw_encoding_reaches_the_node_pixel_exact(session: NodeSession, overlay, encoding: str,
                                                   pad: int, bigendian: bool) -> None:
    frame = pack_raw(photo(HEIGHT, WIDTH, len(encoding) + pad), encoding, pad=pad,
                     bigendian=bigendian, seed=pad)
    assert frame.step == WIDTH * BYTES_PER_PIXEL[encoding] + pad

    def find(stamp: int):
        return next((m for m in overlay.items() if stamp_ns_of(m.header.stamp) == stamp), None)

    stamp, msg = session.roundtrip(
        lambda s: raw_image(encoding, WIDTH, HEIGHT, frame.step, frame.data, s,
                            frame_id=f'cam_{encoding}', is_bigendian=frame.is_bigendian),
        find, f'the overlay of a {encoding} frame')
    assert (msg.width, msg.height, msg.encoding) == (WIDTH, HEIGHT, 'bgr8')
    assert msg.header.frame_id == f'cam_{encoding}'
    got = overlay_rgb(msg)[HEIGHT // 2:].astype(np.int16)
    want = frame.expected_rgb[HEIGHT // 2:].astype(np.int16)
    diff = np.abs(got - want)
    tolerance = YUV_TOLERANCE if encoding in UYVY + YUYV else 0
    assert diff.max() <= tolerance, (
        f'{encoding}: {np.count_nonzero(diff > tolerance)} channel values differ by more than '
        f'{tolerance} (max {diff.max()}, mean {diff.mean():.3f})')
    # The frame also went through the model: its prediction carries the same stamp.
    session.wait_until(lambda: session.prediction_for(stamp), f'the prediction of {encoding}')


def test_overlay_band_is_darkened_above_the_compared_rows(session: NodeSession,
                                                          overlay) -> None:
    """Sanity check of the method: the top rows are the darkened band, not the photo."""
    rgb = np.full((HEIGHT, WIDTH, 3), 200, dtype=np.uint8)

    def find(stamp: int):
        return next((m for m in overlay.items() if stamp_ns_of(m.header.stamp) == stamp), None)

    _, msg = session.roundtrip(
        lambda s: raw_image('rgb8', WIDTH, HEIGHT, WIDTH * 3, rgb.tobytes(), s), find,
        'the overlay of a flat grey frame')
    got = overlay_rgb(msg)
    assert np.median(got[:10]) < 100  # 200 * 0.35 under the band
    assert (got[HEIGHT // 2:] == 200).all()


# -- bad input ------------------------------------------------------------------------------

def _settled_bad_frames(session: NodeSession) -> tuple[int, int]:
    """(bad_frames, frames_seen) once everything sent so far has been handled: a good frame's
    prediction came back, then a status stamped after it (it counts every earlier frame)."""
    session.predict(_good_frame(), 'a good frame before the bad one')
    bad_frames = int(session.fresh_diagnostics()['values']['bad_frames'])
    return bad_frames, session.actions.items()[-1]['frames_seen']  # the newest prediction


def _big_mono8(stamp: int) -> Image:
    width, height = 7680, 4320  # 8K: larger than max_image_side = 4096
    data = np.random.default_rng(1).integers(0, 256, size=width * height,
                                             dtype=np.uint8).tobytes()
    return raw_image('mono8', width, height, width, data, stamp)


def _pixels(width: int, height: int, bpp: int) -> bytes:
    return np.random.default_rng(width).integers(0, 256, size=width * height * bpp,
                                                 dtype=np.uint8).tobytes()


BAD_FRAMES = {
    # step smaller than width * 3
    'step_too_small': lambda s: raw_image('rgb8', 64, 48, 64 * 3 - 1, _pixels(64, 48, 3), s),
    # data shorter than step * height
    'data_too_short': lambda s: raw_image('rgb8', 64, 48, 64 * 3, _pixels(64, 47, 3), s),
    # size says 64x48 mono16, data is 64x48 mono8
    'size_mismatch': lambda s: raw_image('mono16', 64, 48, 128, _pixels(64, 48, 1), s),
    'unknown_encoding': lambda s: raw_image('bayer_rggb8', 64, 48, 64, _pixels(64, 48, 1), s),
    'empty_encoding': lambda s: raw_image('', 64, 48, 64, _pixels(64, 48, 1), s),
    'empty_data': lambda s: raw_image('rgb8', 64, 48, 64 * 3, b'', s),
    'zero_size': lambda s: raw_image('rgb8', 0, 0, 0, b'', s),
    'zero_width': lambda s: raw_image('rgb8', 0, 48, 0, b'', s),
    'odd_width_yuv422': lambda s: raw_image('yuv422', 63, 48, 126, _pixels(63, 48, 2), s),
    'side_above_max_image_side': _big_mono8,
}


@pytest.mark.parametrize('kind', list(BAD_FRAMES))
def test_bad_raw_frame_is_counted_and_the_node_keeps_predicting(session: NodeSession,
                                                                kind: str) -> None:
    before, frames_seen = _settled_bad_frames(session)
    build = BAD_FRAMES[kind]
    message = build(session.clock.next())  # built once: the 8K frame is 33 MB

    def resend(stamp: int) -> Image:
        message.header.stamp.sec, message.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
        return message

    session.roundtrip(resend, lambda _: _status_with_more_bad_frames(session, before),
                      f'bad_frames to count the {kind} frame', resend_s=8.0)
    assert session.process.alive, session.process.describe()
    # A good frame afterwards still gets a prediction.
    _, prediction = session.predict(_good_frame(3), f'a prediction after {kind}')
    # ... and the bad frame left no trace in the memory: one more frame seen, not two.
    assert prediction['frames_seen'] == frames_seen + 1
    assert session.process.alive


def _status_with_more_bad_frames(session: NodeSession, before: int) -> dict | None:
    return next((d for d in session.diagnostics.items()
                 if int(d['values']['bad_frames']) > before), None)


def test_bad_frames_are_logged_and_diagnostics_keep_flowing(session: NodeSession) -> None:
    """After all the bad input above (or alone): warnings were logged, nothing crashed."""
    session.predict(_good_frame(), 'a prediction')
    status = session.fresh_diagnostics()
    assert session.process.alive
    assert 'Traceback' not in session.process.stderr()
    if int(status['values']['bad_frames']) > 0:
        assert 'bad frame skipped' in session.process.stderr()
    assert int(status['values']['processed']) >= 1
    assert int(status['values']['predictions']) >= 1
