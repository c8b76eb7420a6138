"""malmm-make-bag: write a rosbag2 of a camera panning across photos, for replay and tests.

The photos are scikit-image's samples, or the jpg/png files of --images DIR. Frames are raw
sensor_msgs/Image (rgb8) on TOPIC or, with --compressed, JPEG sensor_msgs/CompressedImage on
TOPIC/compressed.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from malmm_ros.data.bags import STORAGES, bag_info, write_camera_bag
from malmm_ros.data.sample_stream import panning_frames
from malmm_ros.errors import DataError, MalmmError

__all__ = ['PHOTO_SUFFIXES', 'cover', 'load_photos', 'main']

PHOTO_SUFFIXES = ('.jpg', '.jpeg', '.png')
_MARGIN = 1.25  # photos are scaled to 1.25x the window so the window has room to pan


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected HEIGHTxWIDTH such as 480x640, got {text!r}'
                                         ) from None
    if height <= 0 or width <= 0:
        raise argparse.ArgumentTypeError(f'size must be positive, got {text!r}')
    return height, width


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='malmm-make-bag', description=__doc__.splitlines()[0])
    parser.add_argument('out', metavar='OUT', help='bag directory to create (must not exist)')
    parser.add_argument('--compressed', action='store_true',
                        help='write JPEG CompressedImage messages on TOPIC/compressed')
    parser.add_argument('--fps', type=float, default=30.0, help='frame rate (default 30)')
    parser.add_argument('--seconds', type=float, default=20.0, help='length (default 20)')
    parser.add_argument('--images', metavar='DIR', default=None,
                        help='folder of jpg/png photos to pan across (sorted by name)')
    parser.add_argument('--storage', choices=sorted(STORAGES), default='sqlite3',
                        help='rosbag2 storage plugin (default sqlite3)')
    parser.add_argument('--topic', default='/camera/image_raw',
                        help='image topic (default /camera/image_raw)')
    parser.add_argument('--size', type=_size, default=(480, 640), metavar='HxW',
                        help='frame HEIGHTxWIDTH (default 480x640)')
    return parser.parse_args(argv)


def load_photos(folder: str | Path) -> list[np.ndarray]:
    """The jpg/png files of `folder`, sorted by name, as RGB arrays; DataError if none or bad."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f'--images {folder} is not a folder')
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
    if not files:
        raise DataError(f'--images {folder} holds no {"/".join(PHOTO_SUFFIXES)} files')
    photos, bad = [], []
    for file in files:
        bgr = cv2.imread(str(file), cv2.IMREAD_COLOR)
        if bgr is None or bgr.size == 0:
            bad.append(str(file))
        else:
            photos.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    if bad:
        raise DataError(f'cannot read image file(s): {", ".join(bad)}')
    return photos


def cover(photo: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`photo` scaled (keeping its aspect) to cover 1.25x the `size` window, so it pans well.

    Without this a small photo would be tiled and a huge one would show only a corner.
    """
    height, width = size
    scale = max(_MARGIN * height / photo.shape[0], _MARGIN * width / photo.shape[1])
    new_size = (max(width, math.ceil(photo.shape[1] * scale)),
                max(height, math.ceil(photo.shape[0] * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(photo, new_size, interpolation=interpolation)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
    try:
        if not args.fps > 0 or not args.seconds > 0:
            raise DataError(f'need --fps > 0 and --seconds > 0, got {args.fps} and '
                            f'{args.seconds}')
        if Path(args.out).exists():
            raise DataError(f'{args.out} exists already; not overwriting it')
        photos = None
        if args.images is not None:
            photos = [cover(p, args.size) for p in load_photos(args.images)]
        frames = panning_frames(args.seconds, args.fps, size=args.size, photos=photos)
        total = int(round(args.seconds * args.fps))
        count = write_camera_bag(
            args.out, tqdm(frames, total=total, desc='frames', unit='frame', file=sys.stderr),
            topic=args.topic, compressed=args.compressed, storage=args.storage)
        info = bag_info(args.out)
        topic = next(iter(info['topics']))
        print(f'{args.out}: {count} messages on {topic}, {info["duration_s"]:.2f} s, '
              f'{info["storage"]}')
    except MalmmError as exc:
        print(f'ERROR: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
