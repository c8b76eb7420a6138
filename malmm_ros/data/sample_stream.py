"""A camera-like stream of real photos: a window panning across scikit-image's sample images.

Used by the demo, tests and benchmarks when no camera or dataset is at hand. scikit-image ships
the photos, so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from malmm_ros.errors import DataError

__all__ = ['SCENES', 'panning_frames']

# Photos that ImageNet classes describe well (cat, coffee cup, astronaut, rocket).
SCENES = ('coffee', 'chelsea', 'astronaut', 'rocket')


def _load(name: str) -> np.ndarray:
    try:
        from skimage import data
    except ImportError:
        raise DataError('the sample stream needs scikit-image (pip install scikit-image)'
                        ) from None
    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def panning_frames(
    seconds: float,
    fps: float = 30.0,
    *,
    size: tuple[int, int] = (240, 320),
    scenes: tuple[str, ...] = SCENES,
    seconds_per_scene: float = 4.0,
    start_ns: int = 0,
) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (HxWx3 uint8 RGB frame, stamp_ns) at `fps` for `seconds`.

    Each scene is shown for `seconds_per_scene` while a `size` window pans across it, then the
    next scene follows: a stream whose content changes slowly and then abruptly, as a kitchen
    camera's would.
    """
    if fps <= 0 or seconds < 0:
        raise ValueError(f'need fps > 0 and seconds >= 0, got fps={fps}, seconds={seconds}')
    photos = [_load(name) for name in scenes]
    height, width = size
    count = int(round(seconds * fps))
    for i in range(count):
        t = i / fps
        photo = photos[int(t // seconds_per_scene) % len(photos)]
        phase = (t % seconds_per_scene) / seconds_per_scene  # 0..1 across the scene
        # Scale the photo up if it is smaller than the window.
        if photo.shape[0] < height or photo.shape[1] < width:
            reps = (-(-height // photo.shape[0]), -(-width // photo.shape[1]), 1)
            photo = np.tile(photo, reps)
        top = int(phase * (photo.shape[0] - height))
        left = int(phase * (photo.shape[1] - width))
        frame = photo[top:top + height, left:left + width]
        yield np.ascontiguousarray(frame), start_ns + int(round(t * 1e9))
