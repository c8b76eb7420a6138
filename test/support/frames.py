"""Test frames: real photos packed into every raw encoding, with what each must decode to.

The packing and the expected RGB are written here from the encodings' definitions (BT.601 for
YUV 4:2:2, full-range scaling for mono16) and never call malmm_ros.imaging, so a
decoding mistake in the node cannot hide behind the same mistake in the test.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from malmm_ros.data.sample_stream import panning_frames

BYTES_PER_PIXEL = {'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1, 'mono16': 2,
                   'yuv422': 2, 'uyvy': 2, 'yuv422_yuy2': 2, 'yuyv': 2}
UYVY = ('yuv422', 'uyvy')
YUYV = ('yuv422_yuy2', 'yuyv')


@lru_cache(maxsize=8)
def _photos(height: int, width: int, count: int) -> tuple[np.ndarray, ...]:
    frames = panning_frames(count / 2.0, fps=2.0, size=(height, width), seconds_per_scene=1.0)
    return tuple(frame for frame, _ in frames)


def photo(height: int, width: int, index: int = 0) -> np.ndarray:
    """A real HxWx3 uint8 RGB photo crop (read only); index picks one of 8 crops."""
    photos = _photos(height, width, 8)
    image = photos[index % len(photos)]
    image.flags.writeable = False
    return image


@dataclass(frozen=True)
class RawFrame:
    encoding: str
    width: int
    height: int
    step: int
    is_bigendian: int
    data: bytes
    expected_rgb: np.ndarray  # what the node must decode `data` to


def _pad_rows(rows: np.ndarray, pad: int, rng: np.random.Generator) -> tuple[bytes, int]:
    """rows: (height, row_bytes) uint8 -> (bytes with `pad` random bytes after each row, step)."""
    height, row_bytes = rows.shape
    filler = rng.integers(0, 256, size=(height, pad), dtype=np.uint8)
    padded = np.concatenate([rows, filler], axis=1) if pad else rows
    return np.ascontiguousarray(padded).tobytes(), row_bytes + pad


def rgb_to_yuv422(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BT.601 studio range (Y 16..235, Cb/Cr 16..240); chroma averaged over pixel pairs.

    Returns Y (H, W), U (H, W/2), V (H, W/2) as uint8.
    """
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    u = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0
    v = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0
    u = (u[:, 0::2] + u[:, 1::2]) / 2.0
    v = (v[:, 0::2] + v[:, 1::2]) / 2.0
    return tuple(np.clip(np.rint(c), 0, 255).astype(np.uint8) for c in (y, u, v))


def yuv422_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The BT.601 studio-range inverse: R = 1.164(Y-16) + 1.596(V-128), and so on."""
    yf = 1.164 * (y.astype(np.float64) - 16.0)
    uf = np.repeat(u.astype(np.float64) - 128.0, 2, axis=1)
    vf = np.repeat(v.astype(np.float64) - 128.0, 2, axis=1)
    rgb = np.stack([yf + 1.596 * vf, yf - 0.813 * vf - 0.391 * uf, yf + 2.018 * uf], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def pack_raw(rgb: np.ndarray, encoding: str, *, pad: int = 0, bigendian: bool = False,
             seed: int = 0) -> RawFrame:
    """`rgb` (HxWx3 uint8) as a sensor_msgs/Image payload in `encoding`.

    Each row is followed by `pad` random bytes (step = width * bytes per pixel + pad). The
    expected RGB is what a correct decoder returns: the photo itself for the 8-bit colour
    encodings, the grey level for mono, the BT.601 decode of the packed YUV for 4:2:2.
    """
    rng = np.random.default_rng(seed)
    height, width = rgb.shape[:2]
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if encoding in ('rgb8', 'bgr8', 'rgba8', 'bgra8'):
        pixels = rgb[..., ::-1] if encoding.startswith('bgr') else rgb
        if encoding.endswith('a8'):
            alpha = rng.integers(0, 256, size=(height, width, 1), dtype=np.uint8)
            pixels = np.concatenate([pixels, alpha], axis=2)
        rows = np.ascontiguousarray(pixels).reshape(height, -1)
        expected = rgb
        big = 0
    elif encoding == 'mono8':
        grey = rgb[..., 1]
        rows = np.ascontiguousarray(grey)
        expected = np.repeat(grey[..., None], 3, axis=2)
        big = 0
    elif encoding == 'mono16':
        # Use all 16 bits: grey * 257 plus noise, so the low byte matters and the scaling to 8
        # bits rounds both ways. v * 255 / 65535 = v / 257 is never exactly x.5.
        noise = rng.integers(-128, 129, size=(height, width))
        values = np.clip(rgb[..., 1].astype(np.int64) * 257 + noise, 0, 65535)
        dtype = '>u2' if bigendian else '<u2'
        rows = values.astype(dtype).view(np.uint8).reshape(height, width * 2)
        grey = np.rint(values * 255 / 65535).astype(np.uint8)
        expected = np.repeat(grey[..., None], 3, axis=2)
        big = int(bigendian)
    elif encoding in UYVY + YUYV:
        assert width % 2 == 0
        y, u, v = rgb_to_yuv422(rgb)
        packed = np.empty((height, width // 2, 4), dtype=np.uint8)
        if encoding in UYVY:  # U0 Y0 V0 Y1
            packed[..., 0], packed[..., 1], packed[..., 2], packed[..., 3] = (
                u, y[:, 0::2], v, y[:, 1::2])
        else:  # Y0 U0 Y1 V0
            packed[..., 0], packed[..., 1], packed[..., 2], packed[..., 3] = (
                y[:, 0::2], u, y[:, 1::2], v)
        rows = packed.reshape(height, width * 2)
        expected = yuv422_to_rgb(y, u, v)
        big = 0
    else:
        raise ValueError(f'no reference packing for {encoding!r}')
    data, step = _pad_rows(rows, pad, rng)
    assert step == width * BYTES_PER_PIXEL[encoding] + pad
    return RawFrame(encoding, width, height, step, big, data, expected)


def overlay_rgb(msg: object) -> np.ndarray:
    """A malmm/overlay sensor_msgs/Image (bgr8) as HxWx3 RGB, decoded here."""
    assert msg.encoding == 'bgr8', msg.encoding
    height, width, step = msg.height, msg.width, msg.step
    rows = np.frombuffer(msg.data, dtype=np.uint8)[:height * step].reshape(height, step)
    return rows[:, :width * 3].reshape(height, width, 3)[..., ::-1]
