"""sensor_msgs/Image and CompressedImage payloads <-> numpy RGB (malmm_ros.imaging).

Every payload is packed by hand here with numpy (the layouts of REP 118 / sensor_msgs), so a
decoder that mixes up channel order, endianness, row padding or the YUV byte order fails.
"""

from __future__ import annotations

import array
import dataclasses
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from malmm_ros.config import AnticipateConfig
from malmm_ros.decode_limits import MAX_DECODE_PIXELS
from malmm_ros.errors import FrameError
from malmm_ros.imaging import decode_compressed, decode_image, encode_bgr8
from support import image_bombs
from support.image_bombs import BOMBS

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 6, 10


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _random_rgb(height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> np.ndarray:
    return _rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _serialize(rows: np.ndarray, pad: int, seed: int = 99) -> tuple[int, bytes]:
    """(step, data) of `rows` (height x row_bytes uint8) with `pad` garbage bytes per row."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    garbage = _rng(seed).integers(0, 256, (rows.shape[0], pad), dtype=np.uint8)
    padded = np.concatenate([rows, garbage], axis=1)
    return padded.shape[1], padded.tobytes()


# -- hand packing --------------------------------------------------------------------------


def _pack_channels(rgb: np.ndarray, order: str, alpha_seed: int = 5) -> np.ndarray:
    """rgb -> height x (width*len(order)) bytes in channel `order` ('bgra', 'rgb', ...)."""
    height, width = rgb.shape[:2]
    alpha = _rng(alpha_seed).integers(0, 256, (height, width), dtype=np.uint8)
    planes = {'r': rgb[..., 0], 'g': rgb[..., 1], 'b': rgb[..., 2], 'a': alpha}
    return np.stack([planes[c] for c in order], axis=-1).reshape(height, -1)


def _bt601_yuv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Studio-swing BT.601 (Y 16..235, U/V 16..240), the classic integer approximation."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    u = ((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128
    v = ((112 * r - 94 * g - 18 * b + 128) >> 8) + 128
    return y, u, v


def _pack_yuv422(rgb: np.ndarray, layout: str) -> np.ndarray:
    """4:2:2 with U/V averaged over each horizontal pixel pair; UYVY or YUYV byte order."""
    y, u, v = _bt601_yuv(rgb)
    u_pair = (u[:, 0::2] + u[:, 1::2] + 1) // 2
    v_pair = (v[:, 0::2] + v[:, 1::2] + 1) // 2
    y0, y1 = y[:, 0::2], y[:, 1::2]
    if layout == 'uyvy':
        quads = [u_pair, y0, v_pair, y1]
    elif layout == 'yuyv':
        quads = [y0, u_pair, y1, v_pair]
    else:
        raise AssertionError(layout)
    return np.stack(quads, axis=-1).reshape(rgb.shape[0], -1).astype(np.uint8)


def _smooth_pairs(height: int = HEIGHT, width: int = WIDTH, seed: int = 3) -> np.ndarray:
    """Random colours, constant over each horizontal 2-pixel block (exact under 4:2:2)."""
    blocks = _rng(seed).integers(0, 256, (height, width // 2, 3), dtype=np.uint8)
    return np.repeat(blocks, 2, axis=1)


PACKED_RGB = {  # encoding -> channel order of its bytes
    'rgb8': 'rgb', 'bgr8': 'bgr', 'rgba8': 'rgba', 'bgra8': 'bgra',
}
YUV_LAYOUTS = {'yuv422': 'uyvy', 'uyvy': 'uyvy', 'yuv422_yuy2': 'yuyv', 'yuyv': 'yuyv'}


# -- raw decoding --------------------------------------------------------------------------


@pytest.mark.parametrize('pad', [0, 5], ids=['unpadded', 'padded'])
@pytest.mark.parametrize('encoding', sorted(PACKED_RGB))
def test_colour_encodings_decode_exactly(encoding: str, pad: int) -> None:
    rgb = _random_rgb()
    step, data = _serialize(_pack_channels(rgb, PACKED_RGB[encoding]), pad)
    out = decode_image(encoding, WIDTH, HEIGHT, step, False, data)
    assert out.shape == (HEIGHT, WIDTH, 3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize('encoding', sorted(PACKED_RGB))
def test_is_bigendian_does_not_matter_for_8_bit_channels(encoding: str) -> None:
    rgb = _random_rgb(seed=4)
    step, data = _serialize(_pack_channels(rgb, PACKED_RGB[encoding]), 0)
    np.testing.assert_array_equal(decode_image(encoding, WIDTH, HEIGHT, step, True, data), rgb)


def test_rgb_and_bgr_of_the_same_bytes_are_channel_swapped() -> None:
    rgb = _random_rgb(seed=8)
    step, data = _serialize(_pack_channels(rgb, 'rgb'), 0)
    as_bgr = decode_image('bgr8', WIDTH, HEIGHT, step, False, data)
    np.testing.assert_array_equal(as_bgr, rgb[..., ::-1])


@pytest.mark.parametrize('pad', [0, 3], ids=['unpadded', 'padded'])
def test_mono8_decodes_to_equal_rgb_channels(pad: int) -> None:
    gray = _rng(1).integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
    step, data = _serialize(gray, pad)
    out = decode_image('mono8', WIDTH, HEIGHT, step, False, data)
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=2))


@pytest.mark.parametrize('pad', [0, 6], ids=['unpadded', 'padded'])
@pytest.mark.parametrize('bigendian', [False, True], ids=['little', 'big'])
def test_mono16_scales_full_range_to_8_bits(bigendian: bool, pad: int) -> None:
    values = _rng(2).integers(0, 65536, (HEIGHT, WIDTH), dtype=np.uint64)
    values[0, :4] = [0, 65535, 128, 32896]  # ends of the range and rounding neighbours
    raw = values.astype('>u2' if bigendian else '<u2').view(np.uint8).reshape(HEIGHT, -1)
    step, data = _serialize(raw, pad)
    out = decode_image('mono16', WIDTH, HEIGHT, step, bigendian, data)
    expected = np.array([[round(int(v) * 255 / 65535) for v in row] for row in values])
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=2))


def test_mono16_scaling_is_rounded_for_every_value() -> None:
    width = 256
    values = np.arange(65536, dtype=np.uint32).reshape(-1, width)
    data = values.astype('<u2').tobytes()
    out = decode_image('mono16', width, values.shape[0], width * 2, False, data)
    expected = np.array([round(v * 255 / 65535) for v in range(65536)]).reshape(values.shape)
    np.testing.assert_array_equal(out[..., 0], expected)


def test_mono16_endianness_is_honoured() -> None:
    values = np.full((2, 4), 0x00FF, dtype=np.uint16)  # 255 -> 1; read swapped it is 65280
    data = values.astype('<u2').tobytes()
    little = decode_image('mono16', 4, 2, 8, False, data)
    big = decode_image('mono16', 4, 2, 8, True, data)
    assert (little == 1).all()
    assert (big == round(0xFF00 * 255 / 65535)).all()


@pytest.mark.parametrize('pad', [0, 4], ids=['unpadded', 'padded'])
@pytest.mark.parametrize('encoding', sorted(YUV_LAYOUTS))
def test_yuv422_decodes_close_to_the_source(encoding: str, pad: int) -> None:
    rgb = _smooth_pairs()
    step, data = _serialize(_pack_yuv422(rgb, YUV_LAYOUTS[encoding]), pad)
    out = decode_image(encoding, WIDTH, HEIGHT, step, False, data)
    error = np.abs(out.astype(np.int32) - rgb.astype(np.int32))
    assert out.shape == (HEIGHT, WIDTH, 3)
    assert error.max() <= 12, error.max()
    assert error.mean() <= 3.0, error.mean()


@pytest.mark.parametrize('encoding', sorted(YUV_LAYOUTS))
def test_yuv422_with_the_other_byte_order_is_clearly_wrong(encoding: str) -> None:
    rgb = _smooth_pairs(seed=11)
    other = 'yuyv' if YUV_LAYOUTS[encoding] == 'uyvy' else 'uyvy'
    step, data = _serialize(_pack_yuv422(rgb, other), 0)
    out = decode_image(encoding, WIDTH, HEIGHT, step, False, data)
    error = np.abs(out.astype(np.int32) - rgb.astype(np.int32))
    assert error.mean() > 30, error.mean()


def test_yuv422_averages_chroma_over_pixel_pairs() -> None:
    """Unequal pairs: luma stays per pixel, so brightness edges inside a pair survive."""
    gray = np.zeros((2, 4, 3), dtype=np.uint8)
    gray[:, 0::2] = 40
    gray[:, 1::2] = 220
    step, data = _serialize(_pack_yuv422(gray, 'uyvy'), 0)
    out = decode_image('uyvy', 4, 2, step, False, data).astype(np.int32)
    assert np.abs(out - gray).max() <= 4


# -- payload types -------------------------------------------------------------------------

PAYLOADS: dict[str, Callable[[bytes, int], object]] = {
    'bytes': lambda data, step: bytes(data),
    'bytearray': lambda data, step: bytearray(data),
    'memoryview': lambda data, step: memoryview(data),
    'array.array': lambda data, step: array.array('B', data),
    'ndarray': lambda data, step: np.frombuffer(data, dtype=np.uint8).copy(),
    'ndarray_2d': lambda data, step: np.frombuffer(data, dtype=np.uint8).reshape(-1, step),
    'ndarray_strided': lambda data, step: np.repeat(np.frombuffer(data, np.uint8), 2)[::2],
}


@pytest.mark.parametrize('payload', sorted(PAYLOADS))
@pytest.mark.parametrize('encoding', ['rgb8', 'bgra8', 'mono8', 'uyvy'])
def test_every_payload_type_decodes_the_same(encoding: str, payload: str) -> None:
    rgb = _smooth_pairs(seed=21)
    if encoding == 'uyvy':
        rows = _pack_yuv422(rgb, 'uyvy')
    elif encoding == 'mono8':
        rows = rgb[..., 1]
    else:
        rows = _pack_channels(rgb, PACKED_RGB[encoding])
    step, data = _serialize(rows, 2)
    reference = decode_image(encoding, WIDTH, HEIGHT, step, False, data)
    out = decode_image(encoding, WIDTH, HEIGHT, step, False, PAYLOADS[payload](data, step))
    np.testing.assert_array_equal(out, reference)


def test_mono16_from_a_uint16_array_payload() -> None:
    values = _rng(6).integers(0, 65536, (HEIGHT, WIDTH)).astype('<u2')
    out = decode_image('mono16', WIDTH, HEIGHT, WIDTH * 2, False, values)
    expected = np.rint(values.astype(np.float64) * 255 / 65535)
    np.testing.assert_array_equal(out[..., 2], expected)


# Regression: rgb8 without row padding must be decoded into a new array, never a view of
# the message buffer (read-only for bytes, aliasing for bytearray/ndarray).
@pytest.mark.parametrize('payload', ['bytes', 'bytearray', 'ndarray'])
def test_rgb8_result_is_a_new_writable_array(payload: str) -> None:
    rgb = _random_rgb(seed=7)
    step, data = _serialize(_pack_channels(rgb, 'rgb'), 0)
    source = PAYLOADS[payload](data, step)
    out = decode_image('rgb8', WIDTH, HEIGHT, step, False, source)
    shared = np.shares_memory(out, np.frombuffer(source, dtype=np.uint8))
    assert (out.flags.writeable, shared) == (True, False), 'rgb8 frame is a view of the input'


@pytest.mark.parametrize('encoding', ['bgr8', 'rgba8', 'bgra8', 'mono8', 'mono16', 'yuyv'])
def test_other_encodings_return_a_new_writable_array(encoding: str) -> None:
    bpp = {'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1, 'mono16': 2, 'yuyv': 2}[encoding]
    source = bytearray(_rng(9).integers(0, 256, HEIGHT * WIDTH * bpp, dtype=np.uint8))
    out = decode_image(encoding, WIDTH, HEIGHT, WIDTH * bpp, False, source)
    assert out.flags.writeable
    assert not np.shares_memory(out, np.frombuffer(source, dtype=np.uint8))


# -- raw errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(('args', 'message'), [
    (('rgb16', 4, 2, 24, False, bytes(48)), r"unsupported encoding 'rgb16'"),
    (('RGB8', 4, 2, 12, False, bytes(24)), r"unsupported encoding 'RGB8'"),
    (('rgb8', 0, 2, 0, False, b''), r'image is 0x2: nothing to decode'),
    (('rgb8', 4, 0, 12, False, b''), r'image is 4x0: nothing to decode'),
    (('rgb8', 4, 2, 11, False, bytes(24)), r'step 11 is smaller than width\*3 = 12 for rgb8'),
    (('mono16', 4, 2, 7, False, bytes(16)), r'step 7 is smaller than width\*2 = 8'),
    (('bgra8', 4, 2, 16, False, bytes(31)), r'data has 31 bytes, expected step\*height = '
                                            r'16\*2 = 32'),
    (('mono8', 4, 2, 6, False, bytes(8)), r'data has 8 bytes, expected .* = 12'),
    (('rgb8', 4, 2, 12, False, b''), r'data has 0 bytes'),
    (('mono8', 4, 2, 4, False, bytearray()), r'data has 0 bytes'),
    (('uyvy', 5, 2, 10, False, bytes(20)), r'uyvy needs an even width, got 5'),
    (('yuv422_yuy2', 3, 2, 6, False, bytes(12)), r'yuv422_yuy2 needs an even width, got 3'),
])
def test_bad_headers_raise_frame_error(args: tuple, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_image(*args)


@pytest.mark.parametrize(('width', 'height'), [(7680, 4320), (4320, 7680), (4097, 1)])
def test_oversized_header_is_refused_before_the_data_is_checked(width: int, height: int
                                                                ) -> None:
    with pytest.raises(FrameError, match=rf'image is {width}x{height}, larger than '
                                         r'max_image_side=4096'):
        decode_image('rgb8', width, height, width * 3, False, b'')


def test_max_side_is_inclusive_and_configurable() -> None:
    rgb = _random_rgb(32, 64, seed=12)
    data = rgb.tobytes()
    np.testing.assert_array_equal(decode_image('rgb8', 64, 32, 192, False, data, max_side=64),
                                  rgb)
    with pytest.raises(FrameError, match=r'image is 64x32, larger than max_image_side=63'):
        decode_image('rgb8', 64, 32, 192, False, data, max_side=63)


def test_frame_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match='unsupported encoding'):
        decode_image('nv12', 4, 4, 4, False, bytes(24))


def test_trailing_bytes_after_the_last_row_are_ignored() -> None:
    rgb = _random_rgb(seed=13)
    data = rgb[..., ::-1].tobytes() + b'\x01\x02\x03'
    np.testing.assert_array_equal(decode_image('bgr8', WIDTH, HEIGHT, WIDTH * 3, False, data),
                                  rgb)


# -- compressed ----------------------------------------------------------------------------


def _gradient(height: int = 48, width: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 4, yy * 5, (xx + yy) * 2], axis=-1).clip(0, 255).astype(np.uint8)


def _encode(rgb: np.ndarray, ext: str, *params: int) -> bytes:
    ok, buffer = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]), list(params))
    assert ok
    return buffer.tobytes()


@pytest.mark.parametrize('fmt', ['jpeg', 'jpg', 'JPEG', 'rgb8; jpeg compressed bgr8', ''])
def test_jpeg_decodes_close_to_the_original(fmt: str) -> None:
    rgb = _gradient()
    out = decode_compressed(fmt, _encode(rgb, '.jpg', cv2.IMWRITE_JPEG_QUALITY, 95))
    error = np.abs(out.astype(np.int32) - rgb.astype(np.int32))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert error.mean() < 2.0, error.mean()
    assert error.max() <= 16, error.max()
    # channel order: the swapped image is far away
    assert np.abs(out[..., ::-1].astype(np.int32) - rgb).mean() > 10


@pytest.mark.parametrize('fmt', ['png', 'PNG', 'bgr8; png compressed bgr8', ''])
def test_png_decodes_exactly(fmt: str) -> None:
    rgb = _random_rgb(37, 53, seed=14)
    np.testing.assert_array_equal(decode_compressed(fmt, _encode(rgb, '.png')), rgb)


def test_png_gray_and_rgba_become_rgb() -> None:
    gray = _rng(15).integers(0, 256, (9, 7), dtype=np.uint8)
    ok, encoded = cv2.imencode('.png', gray)
    assert ok
    np.testing.assert_array_equal(decode_compressed('png', encoded.tobytes()),
                                  np.repeat(gray[..., None], 3, axis=2))
    rgb = _random_rgb(9, 7, seed=16)
    bgra = np.concatenate([rgb[..., ::-1], np.full((9, 7, 1), 128, np.uint8)], axis=2)
    ok, encoded = cv2.imencode('.png', bgra)
    assert ok
    np.testing.assert_array_equal(decode_compressed('png', encoded.tobytes()), rgb)


@pytest.mark.parametrize('payload', sorted(PAYLOADS))
def test_compressed_payload_types(payload: str) -> None:
    rgb = _random_rgb(8, 8, seed=17)
    data = _encode(rgb, '.png')
    source = PAYLOADS[payload](data, 1)
    np.testing.assert_array_equal(decode_compressed('png', source), rgb)


@pytest.mark.parametrize('ext', ['.jpg', '.png'])
def test_truncated_image_raises(ext: str) -> None:
    """OpenCV (5.x here) refuses a half file; nothing half-decoded may come back."""
    data = _encode(_gradient(), ext)
    half = data[:len(data) // 2]
    with pytest.raises(FrameError, match=rf'cannot decode .* image of {len(half)} bytes '
                                         r'\(truncated or corrupt\)'):
        decode_compressed(ext[1:], half)


@pytest.mark.parametrize('fmt', ['jpeg', 'png'])
def test_random_bytes_raise(fmt: str) -> None:
    with pytest.raises(FrameError, match=r'neither JPEG nor PNG: it starts with [0-9A-F ]+ '
                                         r'\(no image format known here\)'):
        decode_compressed(fmt, b'\x00' + _rng(18).bytes(3999))


@pytest.mark.parametrize(('magic', 'message'), [
    (b'\xff\xd8\xff', r'JPEG has byte .. at offset \d+ where a marker should start|JPEG '
                      r'(has marker|segment) FF'),
    (b'\x89PNG\r\n\x1a\n', r'PNG of 4008 bytes does not start with its 13-byte IHDR chunk'),
])
def test_random_bytes_behind_the_magic_raise(magic: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_compressed('', magic + _rng(19).bytes(4000))


@pytest.mark.parametrize('empty', [b'', bytearray(), memoryview(b''), np.zeros(0, np.uint8),
                                   array.array('B')], ids=lambda e: type(e).__name__)
def test_empty_compressed_raises(empty: object) -> None:
    with pytest.raises(FrameError, match='compressed image has no data'):
        decode_compressed('jpeg', empty)


@pytest.mark.parametrize('fmt', ['bmp', 'tiff', 'rgb8; webp compressed'])
def test_unsupported_compressed_format_raises(fmt: str) -> None:
    valid_png = _encode(_random_rgb(4, 4), '.png')
    with pytest.raises(FrameError, match=rf"unsupported compressed format '{fmt}'"):
        decode_compressed(fmt, valid_png)


def test_compressed_image_larger_than_max_side_raises() -> None:
    data = _encode(np.zeros((10, 5000, 3), np.uint8), '.png')
    with pytest.raises(FrameError, match=r'image is 5000x10, larger than max_image_side=4096'):
        decode_compressed('png', data)
    assert decode_compressed('png', data, max_side=5000).shape == (10, 5000, 3)
    small = _encode(_random_rgb(20, 30), '.jpg')
    with pytest.raises(FrameError, match=r'image is 30x20, larger than max_image_side=29'):
        decode_compressed('jpeg', small, max_side=29)


# -- decompression bombs -------------------------------------------------------------------
# Payloads from test/support/image_bombs.py: tiny files that declare huge images.

REFUSALS = {  # bomb -> what the refusal must say
    'webp_16383x16383': r"unsupported compressed format 'webp'",
    'webp_labelled_jpeg': r'neither JPEG nor PNG: it starts with 52 49 46 46 .* \(looks like '
                          r'WebP\)',
    'tiff_20000x20000': r"unsupported compressed format 'tiff'",
    'tiff_labelled_png': r'neither JPEG nor PNG: it starts with 49 49 2A 00 .* \(looks like '
                         r'TIFF\)',
    'tiff_unlabelled': r'neither JPEG nor PNG: it starts with 49 49 2A 00 .* \(looks like TIFF\)',
    'jpeg_late_sof_20000x20000': r'image is 20000x20000, larger than max_image_side=4096',
    'png_20000x20000': r'image is 20000x20000, larger than max_image_side=4096',
}

# Runs in a fresh interpreter: the codec is imported first (as in the node, where it sets
# OpenCV's limit), then one bomb is decoded and the growth of the peak RSS printed.
BOMB_SCRIPT = """
import json, resource, sys
from malmm_ros.errors import FrameError
from malmm_ros.imaging import decode_compressed
sys.path.insert(0, {helpers!r})
from support.image_bombs import BOMBS
fmt, make = BOMBS[{name!r}]
data = make()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    image = decode_compressed(fmt, data, max_side={max_side})
    outcome = 'decoded %dx%d' % (image.shape[1], image.shape[0])
except FrameError as exc:
    outcome = 'FrameError: %s' % exc
growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({{'outcome': outcome, 'growth_mib': growth_kib / 1024, 'bytes': len(data)}}))
"""


def _decode_in_subprocess(name: str, max_side: int = 4096) -> dict:
    code = BOMB_SCRIPT.format(helpers=str(REPO / 'test'), name=name, max_side=max_side)
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize('name', sorted(BOMBS))
def test_bomb_is_refused_before_any_pixel_is_decoded(name: str) -> None:
    """Before the fix the mislabelled WebP and TIFF and the late-SOF JPEG were decoded in full
    (peak RSS +1.8, +2.3 and +1.1 GB); refused from their headers, nothing large is allocated."""
    report = _decode_in_subprocess(name)
    assert re.fullmatch(rf'FrameError: .*{REFUSALS[name]}.*', report['outcome']), report
    assert report['bytes'] < 256 * 1024, report  # small payloads ...
    assert report['growth_mib'] < 100, report  # ... that never turn into big allocations


def test_bomb_files_are_real_images() -> None:
    """The bomb builders make files OpenCV decodes (shown at a small size): the refusals above
    are of real images, not of garbage."""
    small = {
        'webp': image_bombs.webp_bomb(24, 16, rgb=(40, 90, 160)),
        'tiff': image_bombs.tiff_bomb(24, 40, rows_per_strip=16),
        'jpeg': image_bombs.late_sof_jpeg(64, 48),
    }
    shapes = {}
    for kind, data in small.items():
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
        assert image is not None, kind
        shapes[kind] = image.shape
    assert shapes == {'webp': (16, 24, 3), 'tiff': (40, 24, 3), 'jpeg': (48, 64, 3)}
    webp = cv2.imdecode(np.frombuffer(small['webp'], np.uint8), cv2.IMREAD_COLOR_RGB)
    assert (webp == (40, 90, 160)).all()


OTHER_FORMATS = {  # extension -> what the refusal says it looks like
    '.webp': 'WebP', '.tiff': 'TIFF', '.bmp': 'BMP', '.gif': 'GIF', '.jp2': 'JPEG 2000',
    '.avif': 'AVIF', '.hdr': 'Radiance HDR', '.ppm': 'PNM/PFM', '.pfm': 'PNM/PFM',
    '.ras': 'Sun raster',
}


@pytest.mark.parametrize('fmt', ['jpeg', 'png', ''])
@pytest.mark.parametrize('ext', sorted(OTHER_FORMATS))
def test_other_formats_are_refused_by_their_magic_bytes(ext: str, fmt: str) -> None:
    """Valid small files OpenCV would decode, whatever `format` claims."""
    rgb = _gradient(64, 64)
    source = rgb.astype(np.float32) / 255 if ext in ('.hdr', '.pfm') else rgb
    data = _encode(source, ext)
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
    with pytest.raises(FrameError, match=rf'neither JPEG nor PNG: it starts with [0-9A-F ]+ '
                                         rf'\(looks like {OTHER_FORMATS[ext]}\); only JPEG '
                                         r'\(FF D8 FF\) and PNG \(89 50 4E 47 0D 0A 1A 0A\)'):
        decode_compressed(fmt, data)


@pytest.mark.parametrize(('fmt', 'ext'), [('png', '.jpg'), ('jpeg', '.png'),
                                          ('rgb8; png compressed bgr8', '.jpg')])
def test_the_magic_bytes_decide_not_the_format_string(fmt: str, ext: str) -> None:
    rgb = _gradient()
    data = _encode(rgb, ext, cv2.IMWRITE_JPEG_QUALITY, 95) if ext == '.jpg' else _encode(rgb, ext)
    out = decode_compressed(fmt, data)
    assert out.shape == rgb.shape
    assert np.abs(out.astype(np.int32) - rgb).mean() < 2.0


def test_progressive_jpeg_decodes() -> None:
    data = image_bombs.jpeg(48, 64, 95, progressive=True)
    assert b'\xff\xc2' in data  # a progressive frame header
    baseline = image_bombs.jpeg(48, 64, 95)
    out = decode_compressed('jpeg', data)
    assert out.shape == (48, 64, 3)
    reference = decode_compressed('jpeg', baseline)
    assert np.abs(out.astype(np.int32) - reference).mean() < 2.0


def _encode_raw(array: np.ndarray, ext: str) -> bytes:
    ok, buffer = cv2.imencode(ext, np.ascontiguousarray(array))
    assert ok
    return buffer.tobytes()


@pytest.mark.parametrize('channels', [1, 3, 4], ids=['gray16', 'rgb16', 'rgba16'])
def test_16_bit_png_decodes_to_8_bit_rgb(channels: int) -> None:
    values = _rng(22).integers(0, 256, (9, 11, channels), dtype=np.uint16)
    wide = values * 257  # v * 257 is v in both bytes: 8 bits exactly, truncated or rounded
    bgr_order = wide[..., [2, 1, 0, 3][:channels]] if channels > 1 else wide[..., 0]
    out = decode_compressed('png', _encode_raw(bgr_order, '.png'))
    expected = np.repeat(values, 3, axis=2) if channels == 1 else values[..., :3]
    np.testing.assert_array_equal(out, expected.astype(np.uint8))


# -- the JPEG marker walk --


def _app1(size: int, fill: bytes = b'\0') -> bytes:
    return image_bombs.segment(0xE1, b'Exif\0\0' + fill * (size - 6))


def _sof(width: int, height: int) -> bytes:
    """A baseline SOF segment for one 8-bit component."""
    return image_bombs.segment(0xC0, bytes([8]) + struct.pack('>HH', height, width)
                               + bytes([1, 1, 0x11, 0]))


def test_sof_after_more_than_64_kib_of_segments_is_found() -> None:
    """The old check read the first 64 KiB only; now a legit frame with 196 KB of APP1 first
    decodes, and a huge one is refused before decoding."""
    plain = image_bombs.jpeg()
    late = image_bombs.late_sof_jpeg(64, 48)
    assert len(late) > 3 * 65536 and late.index(b'\xff\xc0') > 128 * 1024
    np.testing.assert_array_equal(decode_compressed('jpeg', late),
                                  decode_compressed('jpeg', plain))
    huge = image_bombs.late_sof_jpeg(8000, 6000)
    with pytest.raises(FrameError, match=r'image is 8000x6000, larger than max_image_side'):
        decode_compressed('jpeg', huge)


def test_sof_like_bytes_inside_other_segments_are_skipped() -> None:
    """An EXIF thumbnail (SOI + SOF of its own) inside APP1, or SOF bytes inside a comment, are
    not the frame header: the walk skips whole segments, as libjpeg does."""
    plain = image_bombs.jpeg()
    thumbnail_of = {'huge': image_bombs.set_jpeg_size(plain, 20000, 20000),
                    'small': image_bombs.set_jpeg_size(plain, 16, 12)}
    reference = decode_compressed('jpeg', plain)
    hidden_huge = image_bombs.jpeg_with_segments(plain, image_bombs.segment(
        0xE1, b'Exif\0\0' + thumbnail_of['huge'][:2000]))
    np.testing.assert_array_equal(decode_compressed('jpeg', hidden_huge), reference)
    comment = image_bombs.jpeg_with_segments(plain, image_bombs.segment(0xFE, _sof(20000, 20000)))
    np.testing.assert_array_equal(decode_compressed('jpeg', comment), reference)
    # and the other way round: a small thumbnail does not hide a huge frame
    huge = image_bombs.set_jpeg_size(plain, 20000, 20000)
    hidden_small = image_bombs.jpeg_with_segments(huge, image_bombs.segment(
        0xE1, b'Exif\0\0' + thumbnail_of['small'][:2000]))
    with pytest.raises(FrameError, match=r'image is 20000x20000, larger than max_image_side'):
        decode_compressed('jpeg', hidden_small)


def test_the_first_of_several_sofs_counts() -> None:
    plain = image_bombs.jpeg()
    with pytest.raises(FrameError, match=r'image is 20000x20000, larger than max_image_side'):
        decode_compressed('jpeg', image_bombs.jpeg_with_segments(plain, _sof(20000, 20000)))
    # a second SOF after the real one: libjpeg refuses the file, never decodes a bigger frame
    sof = plain.index(b'\xff\xc0')
    second = plain[:sof] + plain[sof:sof + 19] + _sof(20000, 20000) + plain[sof + 19:]
    assert plain[sof + 2:sof + 4] == b'\x00\x11'  # the real SOF is 19 bytes long (3 components)
    with pytest.raises(FrameError, match=r'cannot decode jpeg image .* \(truncated or corrupt\)'):
        decode_compressed('jpeg', second)


def _with_segments_before_sof(segments: bytes) -> bytes:
    return image_bombs.jpeg_with_segments(image_bombs.jpeg(), segments)


@pytest.mark.parametrize(('data', 'message'), [
    (b'\xff\xd8\xff\xe0\x00\x10JFIF\0\x01\x01\0\0\x01\0\x01\0\0\xff\xd9',
     r'JPEG has marker FF D9 at offset 20, before its frame header'),
    (b'\xff\xd8\xff\xe0\x00\x10JFIF\0\x01\x01\0\0\x01\0\x01\0\0',
     r'JPEG of 20 bytes ends before its frame header \(SOF\)'),
    (b'\xff\xd8\xff\xfe\x00\x01' + bytes(100), r'segment FF FE at offset 2 has length 1'),
    (b'\xff\xd8\xff\xfe\x00\x00' + bytes(100), r'segment FF FE at offset 2 has length 0'),
    (b'\xff\xd8\xff\xe1\xff\xff' + bytes(100), r'segment FF E1 at offset 2 has length 65535, '
                                               r'which does not fit the 106 bytes'),
    (b'\xff\xd8\xff\xfe\x00\x04ab\x00\xff\xc0', r'byte 00 at offset 8 where a marker should'),
    (b'\xff\xd8\xff\xda\x00\x08' + bytes(200), r'marker FF DA at offset 2, before its frame'),
    (b'\xff\xd8\xff\xd8\xff\xc0', r'marker FF D8 at offset 2'),
    (b'\xff\xd8\xff\xc0\x00\x06\x08\x00\x10\x00' + bytes(50), r'frame header at offset 2 is 6 '
                                                              r'bytes long'),
    (_with_segments_before_sof(b'\xff\xfe\x00\x02' * 1000),
     r'JPEG has more than 1000 markers before its frame header'),
], ids=['eoi_before_sof', 'no_sof', 'length_1', 'length_0', 'length_past_end',
        'garbage_between_segments', 'scan_before_sof', 'second_soi', 'short_sof',
        'too_many_markers'])
def test_malformed_jpeg_headers_are_refused_before_decoding(data: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_compressed('jpeg', data)


def test_empty_segments_and_fill_bytes_up_to_the_bound_are_fine() -> None:
    reference = decode_compressed('jpeg', image_bombs.jpeg())
    many = _with_segments_before_sof(b'\xff\xfe\x00\x02' * 900 + b'\xff\xff\xff')
    np.testing.assert_array_equal(decode_compressed('jpeg', many), reference)


def test_a_million_tiny_segments_are_refused_at_the_bound() -> None:
    """4 MB of 4-byte COM segments: the walk stops at its bound instead of crawling them."""
    data = _with_segments_before_sof(b'\xff\xfe\x00\x02' * 1_000_000)
    with pytest.raises(FrameError, match=r'more than 1000 markers before its frame header'):
        decode_compressed('jpeg', data)


def test_fuzzed_jpeg_headers_only_ever_raise_frame_error() -> None:
    """Random marker soups, random lengths and byte flips of a real header: the walk ends
    every time, with a size that is then checked or a FrameError, never another error."""
    rng = _rng(23)
    real = image_bombs.jpeg(16, 16)
    scan = real.index(b'\xff\xda')
    markers = [0xC0, 0xC2, 0xC4, 0xC8, 0xCC, 0xD0, 0xD8, 0xD9, 0xDA, 0xDB, 0xDD, 0xE0, 0xE1,
               0xEF, 0xF0, 0xFE, 0xFF, 0x00, 0x01]
    outcomes = {'decoded': 0, 'refused': 0}
    for trial in range(600):
        if trial % 3 == 0:  # a soup of random segments with random lengths
            parts = [b'\xff\xd8\xff']
            for _ in range(int(rng.integers(1, 12))):
                length = int(rng.integers(0, 40))
                parts.append(bytes([int(rng.choice(markers))]) + struct.pack('>H', length)
                             + rng.bytes(int(rng.integers(0, 40))) + b'\xff')
            data = b''.join(parts)
        elif trial % 3 == 1:  # a real header with bytes flipped
            data = bytearray(real)
            for at in rng.integers(2, scan + 4, int(rng.integers(1, 6))):
                data[int(at)] = int(rng.integers(0, 256))
            data = bytes(data)
        else:  # the magic, then noise
            data = b'\xff\xd8\xff' + rng.bytes(int(rng.integers(0, 300)))
        try:
            image = decode_compressed('jpeg', data, max_side=64)
        except FrameError:
            outcomes['refused'] += 1
        else:
            assert image.ndim == 3 and max(image.shape[:2]) <= 64
            outcomes['decoded'] += 1
    assert outcomes['refused'] > 300, outcomes


# -- PNG header --


def _png_chunks(data: bytes) -> list[bytes]:
    chunks, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], 'big')
        chunks.append(data[pos:pos + 12 + length])
        pos += 12 + length
    return chunks


def test_png_without_ihdr_first_is_refused() -> None:
    data = _encode(_random_rgb(8, 8, seed=24), '.png')
    chunks = _png_chunks(data)
    assert chunks[0][4:8] == b'IHDR'
    text = struct.pack('>I', 5) + b'tEXtab\0cd' + struct.pack('>I', zlib.crc32(b'tEXtab\0cd'))
    moved = data[:8] + text + b''.join(chunks)
    with pytest.raises(FrameError, match=r'PNG of \d+ bytes does not start with its 13-byte '
                                         r'IHDR chunk'):
        decode_compressed('png', moved)
    with pytest.raises(FrameError, match=r'PNG of 20 bytes does not start'):
        decode_compressed('png', data[:20])


def test_pixel_budget_holds_whatever_max_side_says() -> None:
    """A caller may pass a max_side above 16384; the pixel budget still refuses the bomb."""
    data = image_bombs.png_declaring(20000, 20000)
    with pytest.raises(FrameError, match=r'image is 20000x20000 = 400000000 pixels, more than '
                                         r'the 268435456 a frame may have'):
        decode_compressed('png', data, max_side=30000)
    report = _decode_in_subprocess('jpeg_late_sof_20000x20000', max_side=30000)
    assert 'more than the 268435456 a frame may have' in report['outcome'], report
    assert report['growth_mib'] < 100, report


def test_pixel_budget_matches_the_largest_max_image_side() -> None:
    spec = {f.name: f for f in dataclasses.fields(AnticipateConfig)}['max_image_side']
    assert MAX_DECODE_PIXELS == spec.metadata['range'][1] ** 2


# -- OpenCV's own limit --

FENCE_SCRIPT = """
import json, os, sys
import malmm_ros.imaging
import cv2
import numpy as np
sys.path.insert(0, {helpers!r})
from support.image_bombs import png_declaring
out = {{'env': os.environ.get('OPENCV_IO_MAX_IMAGE_PIXELS')}}
for width, height in {sizes!r}:
    try:
        image = cv2.imdecode(np.frombuffer(png_declaring(width, height), np.uint8),
                             cv2.IMREAD_COLOR)
        out['%dx%d' % (width, height)] = 'no error' if image is None else 'decoded'
    except cv2.error as exc:
        out['%dx%d' % (width, height)] = str(exc).strip().splitlines()[-1]
print(json.dumps(out))
"""


def _fence(sizes: list[tuple[int, int]], env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != 'OPENCV_IO_MAX_IMAGE_PIXELS'}
    if env_value is not None:
        env['OPENCV_IO_MAX_IMAGE_PIXELS'] = env_value
    code = FENCE_SCRIPT.format(helpers=str(REPO / 'test'), sizes=sizes)
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize('env_value', [None, ''], ids=['unset', 'empty'])
def test_opencv_refuses_more_pixels_once_the_codec_is_imported(env_value: str | None) -> None:
    """cv2.imdecode itself, called directly, refuses a PNG declaring more than 16384**2 pixels
    before allocating it; at exactly 16384**2 OpenCV only fails on the missing pixel data."""
    out = _fence([(20000, 20000), (16384, 16385), (16384, 16384)], env_value)
    assert out['env'] == str(16384 * 16384)
    for size in ('20000x20000', '16384x16385'):
        assert 'pixels <= CV_IO_MAX_IMAGE_PIXELS' in out[size], out
    assert out['16384x16384'] == 'no error', out


def test_a_pixel_limit_chosen_by_the_user_is_kept() -> None:
    out = _fence([(40, 40), (30, 30)], '1000')
    assert out['env'] == '1000'
    assert 'pixels <= CV_IO_MAX_IMAGE_PIXELS' in out['40x40'], out
    assert out['30x30'] == 'no error', out


def test_opencv_refusal_becomes_a_frame_error() -> None:
    code = ('import os\n'
            "os.environ['OPENCV_IO_MAX_IMAGE_PIXELS'] = '1000'\n"
            'import cv2, numpy as np\n'
            'from malmm_ros.errors import FrameError\n'
            'from malmm_ros.imaging import decode_compressed\n'
            "ok, png = cv2.imencode('.png', np.zeros((40, 40, 3), np.uint8))\n"
            'try:\n'
            "    decode_compressed('png', png.tobytes())\n"
            'except FrameError as exc:\n'
            '    print(exc)\n')
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r'cannot decode png image of \d+ bytes: .*pixels <= '
                        r'CV_IO_MAX_IMAGE_PIXELS.*\n', result.stdout), result.stdout


# -- encode --------------------------------------------------------------------------------


@pytest.mark.parametrize(('height', 'width'), [(1, 1), (HEIGHT, WIDTH), (31, 17)])
def test_encode_bgr8_round_trip(height: int, width: int) -> None:
    rgb = _random_rgb(height, width, seed=19)
    out_width, out_height, step, data = encode_bgr8(rgb)
    assert (out_width, out_height, step) == (width, height, width * 3)
    assert isinstance(data, bytes) and len(data) == step * height
    assert data[:3] == bytes(rgb[0, 0, ::-1])  # blue, green, red
    np.testing.assert_array_equal(decode_image('bgr8', out_width, out_height, step, False, data),
                                  rgb)


def test_encode_bgr8_of_a_non_contiguous_view() -> None:
    rgb = _random_rgb(12, 20, seed=20)[:, ::2]
    width, height, step, data = encode_bgr8(rgb)
    np.testing.assert_array_equal(decode_image('bgr8', width, height, step, False, data), rgb)


# -- no ROS --------------------------------------------------------------------------------


def test_module_imports_no_ros() -> None:
    code = (
        'import sys\n'
        'import malmm_ros.imaging\n'
        "roots = {'rclpy', 'rosidl_runtime_py', 'sensor_msgs', 'std_msgs', 'cv_bridge'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in roots))\n"
    )
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[]'
