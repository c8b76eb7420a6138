"""Decompression bombs: small CompressedImage payloads that declare huge images.

Each is a real file that a decoder without limits decodes in full (pixels and all), built here
by hand from the formats' definitions (RIFF/VP8L, TIFF 6.0, JPEG markers, PNG chunks) so that
none needs the huge image in memory to be made. Shared by test/test_imaging.py (the codec) and
test/ros/test_node_image_bombs.py (the node over DDS).
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

__all__ = ['BOMBS', 'jpeg', 'jpeg_with_segments', 'late_sof_jpeg', 'png_declaring', 'segment',
           'set_jpeg_size', 'tiff_bomb', 'webp_bomb']


class _BitWriter:
    """Bits packed least significant first, as VP8L reads them."""

    def __init__(self) -> None:
        self.value = 0
        self.count = 0

    def write(self, value: int, bits: int) -> None:
        assert 0 <= value < 1 << bits
        self.value |= value << self.count
        self.count += bits

    def bytes(self) -> bytes:
        return self.value.to_bytes((self.count + 7) // 8, 'little')


def webp_bomb(width: int = 16383, height: int = 16383, rgb: tuple[int, int, int] = (40, 90, 160)
              ) -> bytes:
    """A lossless WebP of one colour: every prefix code has a single symbol, so each pixel
    takes zero bits and the whole picture is about 30 bytes."""
    bits = _BitWriter()
    bits.write(width - 1, 14)
    bits.write(height - 1, 14)
    bits.write(0, 1)  # alpha_is_used
    bits.write(0, 3)  # version
    bits.write(0, 1)  # no transform
    bits.write(0, 1)  # no colour cache
    bits.write(0, 1)  # one prefix code group for the whole image
    # green, red, blue, alpha: a "simple" code of one 8-bit symbol
    for symbol in (rgb[1], rgb[0], rgb[2], 255):
        bits.write(1, 1)  # simple code
        bits.write(0, 1)  # one symbol
        bits.write(1, 1)  # 8-bit symbol
        bits.write(symbol, 8)
    bits.write(1, 1)  # distance: simple code, one 1-bit symbol (never used)
    bits.write(0, 1)
    bits.write(0, 1)
    bits.write(0, 1)
    payload = b'\x2f' + bits.bytes()
    if len(payload) % 2:
        payload += b'\0'  # RIFF chunks are padded to even sizes
    chunk = b'VP8L' + struct.pack('<I', len(payload)) + payload
    return b'RIFF' + struct.pack('<I', 4 + len(chunk)) + b'WEBP' + chunk


def tiff_bomb(width: int = 20000, height: int = 20000, rows_per_strip: int = 16) -> bytes:
    """A deflate-compressed RGB TIFF of zeros whose strips all point at the same compressed
    bytes (TIFF allows it), so 1.2 GB of pixels fit in about 12 KB."""
    strip = zlib.compress(bytes(rows_per_strip * width * 3), 9)
    strips = -(-height // rows_per_strip)
    fields = 10
    bits_at = 8 + 2 + 12 * fields + 4  # after the header and the one IFD
    counts_at = bits_at + 6
    offsets_at = counts_at + 4 * strips
    strip_at = offsets_at + 4 * strips
    short, long = 3, 4
    entries = [  # (tag, type, count, value or offset of the values), sorted by tag
        (256, long, 1, width), (257, long, 1, height), (258, short, 3, bits_at),
        (259, short, 1, 8),  # compression: deflate
        (262, short, 1, 2),  # photometric interpretation: RGB
        (273, long, strips, offsets_at), (277, short, 1, 3), (278, long, 1, rows_per_strip),
        (279, long, strips, counts_at),
        (284, short, 1, 1),  # planar configuration: chunky
    ]
    assert len(entries) == fields
    out = bytearray(b'II*\0' + struct.pack('<IH', 8, fields))
    for tag, kind, count, value in entries:
        # one SHORT sits in the first two bytes of the value field
        layout = '<HHIHxx' if (kind, count) == (short, 1) else '<HHII'
        out += struct.pack(layout, tag, kind, count, value)
    out += struct.pack('<I', 0)  # no next IFD
    out += struct.pack('<3H', 8, 8, 8)
    out += struct.pack(f'<{strips}I', *[len(strip)] * strips)
    out += struct.pack(f'<{strips}I', *[strip_at] * strips)
    return bytes(out + strip)


def jpeg(height: int = 48, width: int = 64, quality: int = 90, *, progressive: bool = False
         ) -> bytes:
    """A real baseline (or progressive) JPEG of a colour gradient."""
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                    np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)]
    ok, buffer = cv2.imencode('.jpg', np.ascontiguousarray(rgb[..., ::-1]), params)
    assert ok
    return buffer.tobytes()


def segment(marker: int, payload: bytes) -> bytes:
    """One JPEG marker segment: FF marker, big-endian length (itself included), payload."""
    assert len(payload) <= 65533
    return bytes([0xFF, marker]) + struct.pack('>H', len(payload) + 2) + payload


def jpeg_with_segments(data: bytes, segments: bytes) -> bytes:
    """`data` (a JPEG) with `segments` spliced in right after its SOI marker."""
    assert data[:2] == b'\xff\xd8'
    return data[:2] + segments + data[2:]


def _sof_offset(data: bytes) -> int:
    """Where the first SOF segment of a JPEG written by this module starts (a marker walk)."""
    pos = 2
    while True:
        marker = data[pos + 1]
        if marker in (0xC0, 0xC1, 0xC2):
            return pos
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], 'big')


def set_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """`data` with the width and height of its frame header (SOF) replaced."""
    pos = _sof_offset(data)
    out = bytearray(data)
    out[pos + 5:pos + 9] = struct.pack('>HH', height, width)
    return bytes(out)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares an 8-bit RGB image of width x height, with one IDAT of a few
    zero rows (enough for a decoder to start, never enough to finish)."""
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(bytes(4 * (1 + 3 * min(width, 4096))))
    return (b'\x89PNG\r\n\x1a\n' + _png_chunk(b'IHDR', ihdr) + _png_chunk(b'IDAT', rows)
            + _png_chunk(b'IEND', b''))


def late_sof_jpeg(width: int = 20000, height: int = 20000, app_bytes: int = 3 * 65533
                  ) -> bytes:
    """A JPEG whose SOF (declaring width x height) comes after `app_bytes` of APP1 segments:
    more than a header check that reads only the first 64 KiB can see."""
    segments = b''
    while app_bytes > 0:
        size = min(app_bytes, 65533)
        segments += segment(0xE1, b'Exif\0\0' + bytes(size - 6))
        app_bytes -= size
    return set_jpeg_size(jpeg_with_segments(jpeg(), segments), width, height)


# name -> (format string a sender gives, payload maker); honest and dishonest labels
BOMBS = {
    'webp_16383x16383': ('webp', webp_bomb),
    'webp_labelled_jpeg': ('jpeg', webp_bomb),
    'tiff_20000x20000': ('tiff', tiff_bomb),
    'tiff_labelled_png': ('png', tiff_bomb),
    'tiff_unlabelled': ('', tiff_bomb),
    'jpeg_late_sof_20000x20000': ('rgb8; jpeg compressed bgr8', late_sof_jpeg),
    'png_20000x20000': ('png', lambda: png_declaring(20000, 20000)),
}
