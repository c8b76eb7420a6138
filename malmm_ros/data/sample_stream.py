"""A camera-like stream of real photos: a window panning across scikit-image's sample images.

Used by the demo, tests and benchmarks when no camera or dataset is at hand. scikit-image ships
the photos, so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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


def _checked(photos: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The caller's photos as HxWx3 uint8 RGB arrays; DataError for anything else."""
    if len(photos) == 0:
        raise DataError('panning_frames needs at least one photo')
    out = []
    for index, photo in enumerate(photos):
        photo = np.asarray(photo)
        if photo.dtype != np.uint8 or photo.ndim not in (2, 3) or photo.size == 0 \
                or (photo.ndim == 3 and photo.shape[2] < 3):
            raise DataError(f'photo {index}: expected an HxWx3 or HxW uint8 image, got shape '
                            f'{photo.shape} dtype {photo.dtype}')
        if photo.ndim == 2:
            photo = np.repeat(photo[..., None], 3, axis=2)
        out.append(np.ascontiguousarray(photo[..., :3]))
    return out


def panning_frames(
    seconds: float,
    fps: float = 30.0,
    *,
    size: tuple[int, int] = (240, 320),
    scenes: tuple[str, ...] = SCENES,
    seconds_per_scene: float = 4.0,
    start_ns: int = 0,
    photos: Sequence[np.ndarray] | None = None,
) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (HxWx3 uint8 RGB frame, stamp_ns) at `fps` for `seconds`.

    Each scene is shown for `seconds_per_scene` while a `size` window pans across it, then the
    next scene follows: a stream whose content changes slowly and then abruptly, as a kitchen
    camera's would. `photos` (HxWx3 or HxW uint8 arrays, e.g. the user's own pictures) replace
    the scikit-image `scenes` when given.
    """
    if fps <= 0 or seconds < 0:
        raise ValueError(f'need fps > 0 and seconds >= 0, got fps={fps}, seconds={seconds}')
    photos = [_load(name) for name in scenes] if photos is None else _checked(photos)
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
