"""Camera images without ROS: message payloads <-> numpy RGB, size checks, the encoder's crop.

Raw sensor_msgs/Image and CompressedImage payloads are decoded with numpy and OpenCV, without
cv_bridge, so this is tested without ROS and works with numpy 2 (cv_bridge's numpy 2 breakage is
a common complaint); the node, the bag readers and feature extraction all decode here. Every
failure is a FrameError that says what was wrong; nothing here ever returns a half-decoded frame.

A compressed payload is a decompression bomb waiting to happen (a 32-byte WebP can declare
16383x16383 pixels), so only JPEG and PNG are decoded, recognised by their magic bytes, and their
declared size is read from the header and checked before a single pixel is decoded. OpenCV's own
pixel limit (malmm_ros.decode_limits, imported before cv2 for that reason) is the second fence.

`resize_and_crop` is the encoder's eval geometry (uint8 in, uint8 out), shared by every encoder
backend, the pipeline and feature extraction.
"""

from __future__ import annotations

from malmm_ros.decode_limits import MAX_DECODE_PIXELS

# isort: split
import cv2
import numpy as np
import simplejpeg

from malmm_ros.errors import FrameError

__all__ = ['ENCODINGS', 'IMAGE_SIZE', 'RESIZE_SIZE', 'check_image', 'decode_compressed',
           'decode_image', 'describe_image', 'encode_bgr8', 'resize_and_crop']

IMAGE_SIZE = 224  # the encoder's input side
RESIZE_SIZE = 256  # shorter side before the centre crop: crop fraction 224/256 (TF eval)

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
    budget = min(max_side * max_side, MAX_DECODE_PIXELS)
    if width * height > budget:
        raise FrameError(f'image is {width}x{height} = {width * height} pixels, more than '
                         f'the {budget} a frame may have')


def _uint8_buffer(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """The payload as a contiguous 1-D uint8 array: a view of it unless it was strided."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data.reshape(-1).view(np.uint8))
    return np.frombuffer(data, dtype=np.uint8)


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
    buffer = _uint8_buffer(data)
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
    """A sensor_msgs/CompressedImage payload (JPEG or PNG) -> HxWx3 uint8 RGB.

    The kind comes from the magic bytes, not from `fmt` (which only has to name jpeg or png if
    it names anything), and the size from the header, checked before any pixel is decoded.
    """
    kind = fmt.lower()
    if kind and not any(name in kind for name in ('jpeg', 'jpg', 'png')):
        raise FrameError(f'unsupported compressed format {fmt!r}; expected jpeg or png')
    buffer = _uint8_buffer(data)
    if buffer.size == 0:
        raise FrameError('compressed image has no data')
    view = memoryview(buffer)  # header reads without copying the payload
    if view[:3] == _JPEG_MAGIC:
        width, height = _jpeg_size(view)
        _check_size(width, height, max_side)
        # libjpeg only *warns* about corrupt scan data and OpenCV then returns a half-decoded
        # frame; simplejpeg's strict mode turns those warnings into errors.
        try:
            image = simplejpeg.decode_jpeg(buffer, colorspace='RGB', strict=True)
        except ValueError as exc:
            raise FrameError(f'cannot decode {fmt or "jpeg"} image of {buffer.size} bytes '
                             f'(truncated or corrupt): {exc}') from None
    elif view[:8] == _PNG_SIGNATURE:
        width, height = _png_size(view)
        _check_size(width, height, max_side)
        try:
            image = cv2.imdecode(buffer, cv2.IMREAD_COLOR_RGB)
        except cv2.error as exc:  # OpenCV's own limits (decode_limits) raise
            raise FrameError(f'cannot decode {fmt or "png"} image of {buffer.size} bytes: '
                             f'{str(exc).strip().splitlines()[-1]}') from None
        if image is None:
            raise FrameError(f'cannot decode {fmt or "png"} image of {buffer.size} bytes '
                             '(truncated or corrupt)')
    else:
        raise FrameError(f'compressed image is neither JPEG nor PNG: it starts with '
                         f'{bytes(view[:8]).hex(" ").upper()} ({_looks_like(view)}); only JPEG '
                         f'({_JPEG_MAGIC.hex(" ").upper()}) and PNG '
                         f'({_PNG_SIGNATURE.hex(" ").upper()}) are decoded')
    if image.shape[:2] != (height, width):  # the decoder read another size than the header
        raise FrameError(f'image decoded as {image.shape[1]}x{image.shape[0]} but its header '
                         f'says {width}x{height}')
    return image


_JPEG_MAGIC = b'\xff\xd8\xff'  # SOI, then the first marker
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# JPEG start-of-frame markers (C0-CF except DHT C4, JPG C8 and DAC CC) carry the image size.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                       0xCF})
# Segments a decoder reads or skips before the frame header: DHT, DAC, DQT, DRI, APPn, COM.
_JPEG_BEFORE_SOF = frozenset({0xC4, 0xCC, 0xDB, 0xDD, *range(0xE0, 0xF0), 0xFE})
# Far more markers (and fill bytes) than any camera writes before its SOF; it bounds the walk's
# time on a payload made of millions of tiny segments.
_JPEG_MAX_MARKERS = 1000


def _jpeg_size(view: memoryview) -> tuple[int, int]:
    """(width, height) from a JPEG's first frame header (SOF), walking its marker segments.

    The walk goes segment by segment over the whole buffer, as libjpeg does, so an SOF is found
    however many APPn/COM bytes come first, and bytes that only look like an SOF inside another
    segment (an EXIF thumbnail's) are skipped. Anything a decoder would not accept before the
    SOF is refused.
    """
    end = len(view)
    pos = 2  # after SOI
    for _ in range(_JPEG_MAX_MARKERS):
        if pos + 2 > end:
            raise FrameError(f'JPEG of {end} bytes ends before its frame header (SOF)')
        if view[pos] != 0xFF:
            raise FrameError(f'JPEG has byte {view[pos]:02X} at offset {pos} where a marker '
                             'should start')
        marker = view[pos + 1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
            continue
        if marker not in _JPEG_SOF and marker not in _JPEG_BEFORE_SOF:
            raise FrameError(f'JPEG has marker FF {marker:02X} at offset {pos}, before its frame '
                             'header (SOF)')
        if pos + 4 > end:
            raise FrameError(f'JPEG of {end} bytes ends before its frame header (SOF)')
        length = int.from_bytes(view[pos + 2:pos + 4], 'big')  # counts itself, not the marker
        if length < 2 or pos + 2 + length > end:
            raise FrameError(f'JPEG segment FF {marker:02X} at offset {pos} has length {length}, '
                             f'which does not fit the {end} bytes')
        if marker in _JPEG_SOF:
            if length < 8:  # precision, height, width, component count
                raise FrameError(f'JPEG frame header at offset {pos} is {length} bytes long, '
                                 'too short to hold the image size')
            height = int.from_bytes(view[pos + 5:pos + 7], 'big')
            width = int.from_bytes(view[pos + 7:pos + 9], 'big')
            return width, height
        pos += 2 + length
    raise FrameError(f'JPEG has more than {_JPEG_MAX_MARKERS} markers before its frame header '
                     '(SOF)')


def _png_size(view: memoryview) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, which the standard puts first."""
    ihdr = bytes(view[8:24])  # length, type, width, height
    if len(view) < 33 or ihdr[:8] != b'\x00\x00\x00\x0dIHDR':  # 8 + 12 + 13 bytes
        raise FrameError(f'PNG of {len(view)} bytes does not start with its 13-byte IHDR chunk')
    return int.from_bytes(ihdr[8:12], 'big'), int.from_bytes(ihdr[12:16], 'big')


# (offset, magic bytes, name) of formats OpenCV could decode but this module refuses
_OTHER_FORMATS = (
    (8, b'WEBP', 'WebP'), (0, b'II*\x00', 'TIFF'), (0, b'MM\x00*', 'TIFF'), (0, b'GIF8', 'GIF'),
    (0, b'BM', 'BMP'), (4, b'ftypavif', 'AVIF'), (4, b'ftyphei', 'HEIF'),
    (0, b'\x00\x00\x00\x0cjP  ', 'JPEG 2000'), (0, b'\xff\x4f\xff\x51', 'JPEG 2000'),
    (0, b'#?RADIANCE', 'Radiance HDR'), (0, b'#?RGBE', 'Radiance HDR'),
    (0, b'v/1\x01', 'OpenEXR'), (0, b'\x59\xa6\x6a\x95', 'Sun raster'),
    (0, b'\xff\xd8', 'a JPEG start without a marker after it'),
)


def _looks_like(view: memoryview) -> str:
    for offset, magic, name in _OTHER_FORMATS:
        if view[offset:offset + len(magic)] == magic:
            return f'looks like {name}'
    if len(view) >= 2 and view[0] == ord('P') and chr(view[1]) in '1234567Ff':
        return 'looks like PNM/PFM'
    return 'no image format known here'


def encode_bgr8(rgb: np.ndarray) -> tuple[int, int, int, bytes]:
    """HxWx3 uint8 RGB -> (width, height, step, bgr8 bytes) for a sensor_msgs/Image."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    return bgr.shape[1], bgr.shape[0], bgr.shape[1] * 3, bgr.tobytes()


def describe_image(image: object) -> str:
    """Shape and dtype of an array (or the type of anything else), for error messages."""
    if isinstance(image, np.ndarray):
        return f'shape {image.shape}, dtype {image.dtype}'
    return f'type {type(image).__name__}'


def check_image(image: object) -> None:
    """Raise FrameError unless `image` is a non-empty HxWx3 uint8 numpy array (cheap)."""
    if not isinstance(image, np.ndarray):
        raise FrameError(f'expected an HxWx3 uint8 RGB numpy array, got {describe_image(image)}')
    if image.dtype != np.uint8:
        raise FrameError(f'expected a uint8 RGB image, got {describe_image(image)}')
    if image.ndim != 3 or image.shape[2] != 3:
        raise FrameError(f'expected an HxWx3 RGB image, got {describe_image(image)}')
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise FrameError(f'expected a non-empty image, got {describe_image(image)}')


def resize_and_crop(image: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB of any size -> 224x224x3 uint8 RGB (TF EfficientNet eval crop).

    Geometrically this is "resize the shorter side to 256, centre crop 224". It is computed the
    way TF EfficientNet does it (centre crop a square of 224/256 of the shorter side, then
    resize that square to 224), which never builds a huge intermediate for extreme aspect
    ratios. INTER_AREA when shrinking (anti-aliased), INTER_CUBIC when enlarging.
    """
    check_image(image)
    height, width = image.shape[:2]

    crop = max(1, int(IMAGE_SIZE / RESIZE_SIZE * min(height, width)))
    top = (height - crop + 1) // 2
    left = (width - crop + 1) // 2
    # Copy: makes the crop contiguous (OpenCV rejects negative strides, e.g. BGR->RGB views).
    square = np.ascontiguousarray(image[top : top + crop, left : left + crop])
    if crop == IMAGE_SIZE:
        return square
    interpolation = cv2.INTER_AREA if crop > IMAGE_SIZE else cv2.INTER_CUBIC
    return cv2.resize(square, (IMAGE_SIZE, IMAGE_SIZE), interpolation=interpolation)
