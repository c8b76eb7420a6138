"""sensor_msgs/CompressedImage in (input_transport compressed), over DDS: JPEG and PNG decode to
what was sent, and truncated, corrupt, empty, unsupported or oversized images are counted and
skipped while the node keeps predicting.

One malmm_anticipate process serves the module, with the default best-effort camera QoS.
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image

from support.domains import domain_id
from support.frames import overlay_rgb, photo
from support.ros_driver import (
    RELIABLE,
    NodeSession,
    compressed_image,
    running_session,
    stamp_ns_of,
)

DOMAIN_ID = domain_id(__file__)
HEIGHT, WIDTH = 240, 320
PARAMS = ['sample_fps:=0.0', 'publish_every_n:=1', 'memory_bank_length:=8']


@pytest.fixture(scope='module')
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeSession]:
    yield from running_session(DOMAIN_ID, PARAMS, compressed=True,
                               log_dir=tmp_path_factory.mktemp('compressed_node'))


@pytest.fixture(scope='module')
def overlay(session: NodeSession) -> Iterator:
    subscription, inbox = session.driver.subscribe(Image, '/malmm/overlay', RELIABLE)
    try:
        yield inbox
    finally:
        session.driver.node.destroy_subscription(subscription)


def _encode(rgb: np.ndarray, ext: str, *params: int) -> bytes:
    ok, buffer = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]), list(params))
    assert ok
    return buffer.tobytes()


def _overlay_of(session: NodeSession, overlay, fmt: str, data: bytes) -> Image:
    def find(stamp: int) -> Image | None:
        return next((m for m in overlay.items() if stamp_ns_of(m.header.stamp) == stamp), None)

    _, msg = session.roundtrip(lambda s: compressed_image(fmt, data, s, frame_id='cam_c'), find,
                               f'the overlay of a {fmt} frame')
    assert (msg.width, msg.height, msg.encoding) == (WIDTH, HEIGHT, 'bgr8')
    assert msg.header.frame_id == 'cam_c'
    return msg


@pytest.mark.parametrize('fmt', ['png', 'rgb8; png compressed bgr8', ''])
def test_png_frame_reaches_the_node_pixel_exact(session: NodeSession, overlay, fmt: str) -> None:
    rgb = photo(HEIGHT, WIDTH, 2)
    msg = _overlay_of(session, overlay, fmt, _encode(rgb, '.png'))
    got = overlay_rgb(msg)[HEIGHT // 2:]
    assert np.array_equal(got, rgb[HEIGHT // 2:])


@pytest.mark.parametrize('fmt', ['jpeg', 'jpg', 'rgb8; jpeg compressed bgr8'])
def test_jpeg_frame_reaches_the_node(session: NodeSession, overlay, fmt: str) -> None:
    rgb = photo(HEIGHT, WIDTH, 5)
    data = _encode(rgb, '.jpg', cv2.IMWRITE_JPEG_QUALITY, 92)
    msg = _overlay_of(session, overlay, fmt, data)
    got = overlay_rgb(msg)[HEIGHT // 2:].astype(np.int16)
    # Against the photo: JPEG is lossy, so on average close and never far off everywhere.
    error = np.abs(got - rgb[HEIGHT // 2:].astype(np.int16))
    assert error.mean() < 4.0, error.mean()
    assert np.percentile(error, 99) < 40
    # Against the test's own decode of the same bytes: the same pixels up to IDCT rounding.
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    diff = np.abs(got - reference[HEIGHT // 2:].astype(np.int16))
    assert diff.max() <= 2, diff.max()


# -- bad input ------------------------------------------------------------------------------

def _good(stamp: int) -> CompressedImage:
    return compressed_image('jpeg', _encode(photo(HEIGHT // 2, WIDTH // 2, 1), '.jpg'), stamp)


def _jpeg() -> bytes:
    return _encode(photo(HEIGHT, WIDTH, 4), '.jpg', cv2.IMWRITE_JPEG_QUALITY, 90)


def _corrupt(marker: bytes, offset: int, garbage: bytes) -> bytes:
    """The test JPEG with `garbage` written `offset` bytes after its first `marker` segment."""
    data = bytearray(_jpeg())
    start = data.index(marker) + offset
    data[start:start + len(garbage)] = garbage
    return bytes(data)


def _huge_jpeg() -> bytes:
    # 7680x4320 (8K) is above max_image_side = 4096; flat, so the JPEG is small.
    return _encode(np.full((4320, 7680, 3), 90, np.uint8), '.jpg', cv2.IMWRITE_JPEG_QUALITY, 50)


BAD = {
    'truncated_jpeg': lambda: ('jpeg', _jpeg()[:len(_jpeg()) // 2]),
    'jpeg_without_end_marker': lambda: ('jpeg', _jpeg()[:-2]),
    'jpeg_headers_only': lambda: ('jpeg', _jpeg()[:_jpeg().index(b'\xff\xda')]),
    'corrupt_huffman_table': lambda: ('jpeg', _corrupt(b'\xff\xc4', 4, b'\xff' * 36)),
    'corrupt_frame_header': lambda: ('jpeg', _corrupt(b'\xff\xc0', 5, bytes(4))),  # 0x0
    'corrupt_scan_header': lambda: ('jpeg', _corrupt(b'\xff\xda', 2, b'\xee' * 10)),
    'garbage_bytes': lambda: ('jpeg', bytes(range(256)) * 8),
    'empty_data': lambda: ('jpeg', b''),
    'truncated_png': lambda: ('png', _encode(photo(HEIGHT, WIDTH, 6), '.png')[:3000]),
    'corrupt_png': lambda: ('png', _encode(photo(HEIGHT, WIDTH, 6), '.png')[:200] + bytes(5000)),
    'unsupported_format': lambda: ('tiff', _encode(photo(HEIGHT, WIDTH, 6), '.tiff')),
    'side_above_max_image_side': lambda: ('jpeg', _huge_jpeg()),
}


def _status_with_more_bad_frames(session: NodeSession, before: int) -> dict | None:
    return next((d for d in session.diagnostics.items()
                 if int(d['values']['bad_frames']) > before), None)


@pytest.mark.parametrize('kind', list(BAD))
def test_bad_compressed_frame_is_counted_and_the_node_keeps_predicting(session: NodeSession,
                                                                       kind: str) -> None:
    fmt, data = BAD[kind]()
    session.predict(_good, 'a good frame before the bad one')
    before = int(session.fresh_diagnostics()['values']['bad_frames'])
    frames_seen = session.actions.items()[-1]['frames_seen']

    session.roundtrip(lambda s: compressed_image(fmt, data, s),
                      lambda _: _status_with_more_bad_frames(session, before),
                      f'bad_frames to count the {kind} frame')
    assert session.process.alive, session.process.describe()
    _, prediction = session.predict(_good, f'a prediction after {kind}')
    assert prediction['frames_seen'] == frames_seen + 1  # the bad frame left no trace
    assert session.process.alive


def test_node_survived_all_bad_input(session: NodeSession) -> None:
    session.predict(_good, 'a prediction')
    status = session.fresh_diagnostics()
    assert session.process.alive
    assert 'Traceback' not in session.process.stderr()
    assert int(status['values']['processed']) >= 1
