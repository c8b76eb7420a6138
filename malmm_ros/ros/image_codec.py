"""sensor_msgs/Image and CompressedImage payloads <-> numpy RGB, without cv_bridge.

Pure numpy/OpenCV on the message's fields, so it is tested without ROS and works with numpy 2
(cv_bridge's numpy 2 breakage is a common complaint). Every failure is a FrameError that says
what was wrong; nothing here ever returns a half-decoded frame.
"""

from __future__ import annotations

import cv2
import numpy as np
import simplejpeg

from malmm_ros.errors import FrameError

__all__ = ['ENCODINGS', 'decode_compressed', 'decode_image', 'encode_bgr8']

# encoding -> (bytes per pixel, channels of the raw layout)
ENCODINGS = {
    'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1, 'mono16': 2,
    'yuv422': 2, 'uyvy': 2, 'yuv422_yuy2': 2, 'yuyv': 2,
}
_YUV_CODES = {
    'yuv422': cv2.COLOR_YUV2RGB_UYVY, 'uyvy': cv2.COLOR_YUV2RGB_UYVY,
    'yuv422_yuy2': cv2.COLOR_YUV2RGB_YUY2, 'yuyv': cv2.COLOR_YUV2RGB_YUY2,
}


def _check_size(width: int, height: int, max_side: int) -> None:
    if width <= 0 or height <= 0:
        raise FrameError(f'image is {width}x{height}: nothing to decode')
    if max(width, height) > max_side:
        raise FrameError(f'image is {width}x{height}, larger than max_image_side={max_side}')


def decode_image(encoding: str, width: int, height: int, step: int, is_bigendian: bool,
                 data: bytes | bytearray | memoryview | np.ndarray, *,
                 max_side: int = 4096) -> np.ndarray:
    """A raw sensor_msgs/Image payload -> HxWx3 uint8 RGB (a new array).

    Honours `step` (row padding) and `is_bigendian` (mono16). mono16 is scaled to 8 bits over
    its full range, as cv_bridge does.
    """
    if encoding not in ENCODINGS:
        raise FrameError(f'unsupported encoding {encoding!r}; supported: {sorted(ENCODINGS)}')
    _check_size(width, height, max_side)
    pixel_bytes = ENCODINGS[encoding]
    row_bytes = width * pixel_bytes
    if encoding in _YUV_CODES and width % 2:
        raise FrameError(f'{encoding} needs an even width, got {width}')
    if step < row_bytes:
        raise FrameError(f'step {step} is smaller than width*{pixel_bytes} = {row_bytes} '
                         f'for {encoding}')
    buffer = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) \
        else data.reshape(-1).view(np.uint8)
    if buffer.size < step * height:
        raise FrameError(f'data has {buffer.size} bytes, expected step*height = '
                         f'{step}*{height} = {step * height}')
    rows = buffer[:step * height].reshape(height, step)[:, :row_bytes]  # drop row padding

    if encoding == 'mono16':
        dtype = '>u2' if is_bigendian else '<u2'
        mono = np.ascontiguousarray(rows).view(dtype).reshape(height, width).astype(np.uint32)
        mono8 = ((mono * 255 + 32767) // 65535).astype(np.uint8)
        return cv2.cvtColor(mono8, cv2.COLOR_GRAY2RGB)
    if encoding == 'mono8':
        return cv2.cvtColor(np.ascontiguousarray(rows), cv2.COLOR_GRAY2RGB)
    if encoding in _YUV_CODES:
        packed = np.ascontiguousarray(rows).reshape(height, width, 2)
        return cv2.cvtColor(packed, _YUV_CODES[encoding])
    pixels = rows.reshape(height, width, pixel_bytes)
    if encoding == 'rgb8':
        return pixels.copy()  # never a view of the message buffer
    if encoding == 'bgr8':
        return cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_BGR2RGB)
    if encoding == 'rgba8':
        return np.ascontiguousarray(pixels[..., :3])
    return cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_BGRA2RGB)  # bgra8


def decode_compressed(fmt: str, data: bytes | bytearray | memoryview | np.ndarray, *,
                      max_side: int = 4096) -> np.ndarray:
    """A sensor_msgs/CompressedImage payload (jpeg or png) -> HxWx3 uint8 RGB."""
    kind = fmt.lower()
    if not any(name in kind for name in ('jpeg', 'jpg', 'png')) and kind:
        raise FrameError(f'unsupported compressed format {fmt!r}; expected jpeg or png')
    buffer = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) \
        else data.reshape(-1).view(np.uint8)
    if buffer.size == 0:
        raise FrameError('compressed image has no data')
    size = _header_size(buffer)
    if size is not None:  # refuse a decompression bomb before allocating it
        _check_size(size[0], size[1], max_side)
    if buffer[:2].tobytes() == b'\xff\xd8':
        # libjpeg only *warns* about corrupt scan data and OpenCV then returns a half-decoded
        # frame; simplejpeg's strict mode turns those warnings into errors.
        try:
            image = simplejpeg.decode_jpeg(buffer.tobytes(), colorspace='RGB', strict=True)
        except ValueError as exc:
            raise FrameError(f'cannot decode {fmt or "jpeg"} image of {buffer.size} bytes '
                             f'(truncated or corrupt): {exc}') from None
        _check_size(image.shape[1], image.shape[0], max_side)
        return image
    image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if image is None:
        raise FrameError(f'cannot decode {fmt or "compressed"} image of {buffer.size} bytes '
                         '(truncated or corrupt)')
    _check_size(image.shape[1], image.shape[0], max_side)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# JPEG start-of-frame markers (C0-CF except DHT C4, JPG C8 and DAC CC) carry the image size.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _header_size(buffer: np.ndarray) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header without decoding, or None if not found."""
    data = buffer[:65536].tobytes()
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b'IHDR':
        return int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')
    if not data.startswith(b'\xff\xd8'):
        return None
    pos = 2
    while pos + 9 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], 'big')
        if marker in _JPEG_SOF:
            height = int.from_bytes(data[pos + 5:pos + 7], 'big')
            width = int.from_bytes(data[pos + 7:pos + 9], 'big')
            return width, height
        pos += 2 + length
    return None


def encode_bgr8(rgb: np.ndarray) -> tuple[int, int, int, bytes]:
    """HxWx3 uint8 RGB -> (width, height, step, bgr8 bytes) for a sensor_msgs/Image."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    return bgr.shape[1], bgr.shape[0], bgr.shape[1] * 3, bgr.tobytes()
