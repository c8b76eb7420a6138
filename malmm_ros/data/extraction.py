"""Encoder features of EK-100 videos: find the videos, sample their frames, encode, store.

Two source layouts, as EPIC-KITCHENS-100 ships them:
- frames: `<root>/<video_id>/frame_0000000001.jpg` or the official download layout
  `<root>/<participant_id>/rgb_frames/<video_id>/frame_*.jpg`; frame i (1-based) is at
  (i - 1) / fps, fps from EPIC_100_video_info.csv (or given);
- videos: `<dir>/<video_id>.MP4` read with OpenCV; frame j (0-based) is at j / fps of the
  container.

Sampling at `sample_fps`: times t_k = k / sample_fps while t_k <= the last frame's time; each
takes the latest frame at or before it (a frame taken twice is encoded once). Frames go through
the node's preprocessing (`resize_and_crop`) and encoder runner, in batches, and are written by
`FeatureWriter` (malmm_ros.data.features). Missing or corrupt frames are skipped and counted;
the stored times are those of the frames actually encoded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from malmm_ros.data.features import (
    FEATURES_SUFFIX,
    FeatureWriter,
    open_video_features,
)
from malmm_ros.errors import DataError, FrameError, MalmmError
from malmm_ros.files import atomic_write
from malmm_ros.imaging import decode_compressed, resize_and_crop

__all__ = [
    'SUMMARY_FILE',
    'ExtractResult',
    'SampleGrid',
    'VideoSource',
    'extract_all',
    'extract_frames_dir',
    'extract_video_file',
    'features_up_to_date',
    'find_frame_folders',
    'find_video_files',
    'list_frames',
    'write_summary',
]

_log = logging.getLogger(__name__)

SUMMARY_FILE = 'extract_summary.json'
SUMMARY_FORMAT = 'malmm_ros/extract_summary/v1'
FRAME_NAME = re.compile(r'frame_(\d+)\.jpe?g')
VIDEO_SUFFIX = '.mp4'  # compared case-insensitively: EK-100 ships .MP4
# Slack, in frames, for float rounding of k * fps / sample_fps when it should be an integer.
_EPS = 1e-9
_EXAMPLES = 5  # skipped frames named per video in the log


# --------------------------------------------------------------------------------------------
# Finding videos
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoSource:
    """One video to extract: a frames folder or a video file, and its frame rate if known."""

    video_id: str
    kind: str  # 'frames' | 'video'
    path: Path
    fps: float | None = None  # frames: required; video: fallback when the container has none


def _has_frames(folder: Path) -> bool:
    """True if `folder` holds at least one frame_*.jpg (stops at the first: folders are big)."""
    try:
        with os.scandir(folder) as entries:
            return any(FRAME_NAME.fullmatch(entry.name) for entry in entries)
    except OSError:
        return False


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


def find_frame_folders(root: str | os.PathLike) -> dict[str, Path]:
    """{video_id: frames folder} under `root`, in either EK-100 frames layout."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f'frames root {root} is not a folder')
    found: dict[str, Path] = {}
    archives: list[Path] = []

    def add(video_id: str, folder: Path) -> None:
        if video_id in found:
            raise DataError(f'video {video_id} appears twice under {root}: {found[video_id]} '
                            f'and {folder}')
        found[video_id] = folder

    for child in _subfolders(root):
        rgb = child / 'rgb_frames'
        if rgb.is_dir():  # <root>/<participant>/rgb_frames/<video_id>/frame_*.jpg
            archives += sorted(rgb.glob('*.tar'))
            for video in _subfolders(rgb):
                if _has_frames(video):
                    add(video.name, video)
        elif _has_frames(child):  # <root>/<video_id>/frame_*.jpg
            add(child.name, child)
    if not found and archives:
        raise DataError(f'no frame folders under {root}, but {len(archives)} .tar archive(s) '
                        f'such as {archives[0]}: extract them first (tar -xf, one folder per '
                        'video)')
    return found


def find_video_files(directory: str | os.PathLike) -> dict[str, Path]:
    """{video_id: file} for the `<video_id>.MP4` / `.mp4` files of `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f'videos folder {directory} is not a folder')
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix.lower() == VIDEO_SUFFIX:
            if path.stem in found:
                raise DataError(f'video {path.stem} appears twice in {directory}: '
                                f'{found[path.stem].name} and {path.name}')
            found[path.stem] = path
    return found


def list_frames(folder: str | os.PathLike) -> dict[int, str]:
    """{1-based frame number: file name} of the frame_*.jpg files of a frames folder."""
    frames: dict[int, str] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            match = FRAME_NAME.fullmatch(entry.name)
            if match:
                frames[int(match.group(1))] = entry.name
    return frames


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleGrid:
    """Which frames of a `fps` video the sampling times k / sample_fps pick (0-based frames).

    sample_fps 0 takes every frame.
    """

    fps: float
    sample_fps: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.fps) or self.fps <= 0:
            raise DataError(f'fps must be a positive number, got {self.fps!r}')
        if not math.isfinite(self.sample_fps) or self.sample_fps < 0:
            raise DataError(f'sample_fps must be >= 0 (0: every frame), got {self.sample_fps!r}')

    def _position(self, k: int | np.ndarray) -> Any:
        """Sampling time k / sample_fps in frame units (k * fps / sample_fps)."""
        return k * (self.fps / self.sample_fps)

    def frame_of(self, k: int) -> int:
        """The latest frame at or before sampling time k."""
        return math.floor(self._position(k) + _EPS)

    def indices(self, num_frames: int) -> np.ndarray:
        """Sorted unique frames taken from a video of `num_frames` frames (int64)."""
        if num_frames <= 0:
            return np.zeros(0, np.int64)
        if self.sample_fps == 0:
            return np.arange(num_frames, dtype=np.int64)
        ks = np.arange(math.floor((num_frames - 1) * self.sample_fps / self.fps) + 2)
        positions = self._position(ks)
        ks = ks[positions <= (num_frames - 1) + _EPS]  # t_k <= the last frame's time
        return np.unique(np.floor(self._position(ks) + _EPS).astype(np.int64))

    def selector(self) -> Callable[[int], bool | None]:
        """For frames streamed in order 0, 1, 2...: None if frame j is not taken, True if it
        is, False if it is taken only when a later frame exists (its sampling time lies after
        it, which is fine unless it is the video's last frame)."""
        if self.sample_fps == 0:
            return lambda j: True
        state = {'k': 0}

        def select(j: int) -> bool | None:
            k = state['k']
            if self.frame_of(k) != j:
                return None
            exact = self._position(k) <= j + _EPS
            while self.frame_of(k) <= j:
                k += 1
            state['k'] = k
            return exact

        return select


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


@dataclass
class ExtractResult:
    """What happened to one video (a row of the summary)."""

    video_id: str
    source: str
    status: str  # 'extracted' | 'existing' | 'failed'
    path: str
    native_fps: float | None = None
    frames_total: int = 0  # frames in the source
    frames_sampled: int = 0  # frames the sampling picked
    frames_encoded: int = 0
    frames_missing: int = 0
    frames_corrupt: int = 0
    seconds: float = 0.0
    message: str = ''
    skipped_examples: list[str] = field(default_factory=list)

    @property
    def frames_skipped(self) -> int:
        return self.frames_missing + self.frames_corrupt

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), 'frames_skipped': self.frames_skipped}


class _BatchEncoder:
    """Collects sampled frames, encodes them in batches and streams the tokens to the writer."""

    def __init__(self, encoder: Any, writer: FeatureWriter, batch_size: int,
                 result: ExtractResult) -> None:
        limit = getattr(encoder, 'max_batch', None)  # a TensorRT engine has a fixed maximum
        self.batch_size = max(1, min(batch_size, limit) if limit else batch_size)
        self.encoder, self.writer, self.result = encoder, writer, result
        self.times: list[float] = []
        self.crops: list[np.ndarray] = []

    def skip(self, kind: str, what: str, reason: str) -> None:
        if kind == 'missing':
            self.result.frames_missing += 1
        else:
            self.result.frames_corrupt += 1
        _log.debug('%s: skipping %s frame %s: %s', self.result.video_id, kind, what, reason)
        if len(self.result.skipped_examples) < _EXAMPLES:
            self.result.skipped_examples.append(f'{what} ({kind}: {reason})')

    def add(self, time_s: float, image: np.ndarray, what: str) -> None:
        try:
            crop = resize_and_crop(image)
        except FrameError as exc:
            self.skip('corrupt', what, str(exc))
            return
        self.times.append(time_s)
        self.crops.append(crop)
        if len(self.crops) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.crops:
            return
        tokens = self.encoder.run(np.stack(self.crops))  # [B, 224, 224, 3] -> [B, 49, 1280]
        self.writer.append(self.times, tokens)
        self.result.frames_encoded += len(self.crops)
        self.times, self.crops = [], []


def _metadata(result: ExtractResult, encoder: Any, sample_fps: float,
              source_path: Path) -> dict[str, Any]:
    return {
        'backend': encoder.name,
        'sample_fps': float(sample_fps),
        'source': result.source,
        'source_path': str(source_path),
        'native_fps': result.native_fps,
        'frames_total': result.frames_total,
        'frames_sampled': result.frames_sampled,
        'frames_skipped': result.frames_skipped,
        'frames_missing': result.frames_missing,
        'frames_corrupt': result.frames_corrupt,
        'preprocessing': 'malmm_ros.imaging.resize_and_crop (224 px centre crop)',
        'created': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
    }


def _finish(result: ExtractResult, writer: FeatureWriter, encoder: Any, sample_fps: float,
            source_path: Path, started: float) -> ExtractResult:
    if result.frames_encoded == 0:
        raise DataError(f'{source_path}: none of the {result.frames_sampled} sampled frames '
                        f'could be used ({result.frames_missing} missing, '
                        f'{result.frames_corrupt} corrupt)')
    writer.commit(metadata=_metadata(result, encoder, sample_fps, source_path))
    result.seconds = time.perf_counter() - started
    if result.frames_skipped:
        _log.warning('%s: skipped %d of %d sampled frames (%d missing, %d corrupt), e.g. %s',
                     result.video_id, result.frames_skipped, result.frames_sampled,
                     result.frames_missing, result.frames_corrupt,
                     '; '.join(result.skipped_examples[:2]))
    return result


def extract_frames_dir(video_id: str, folder: str | os.PathLike, out_path: str | os.PathLike,
                       encoder: Any, *, fps: float, sample_fps: float, batch_size: int = 8,
                       progress: bool = True) -> ExtractResult:
    """Encode the sampled frames of one frames folder into `out_path`.

    The last frame present sets the video's end; a sampled frame whose file is missing or
    does not decode (strict JPEG decoding, as the node does) is skipped and counted.
    DataError if the folder has no frames or none could be encoded (no file is written then).
    """
    folder, started = Path(folder), time.perf_counter()
    grid = SampleGrid(fps, sample_fps)
    try:
        frames = list_frames(folder)
    except OSError as exc:
        raise DataError(f'cannot list frames folder {folder}: {exc.strerror or exc}') from None
    if not frames:
        raise DataError(f'frames folder {folder} holds no frame_*.jpg files')
    num_frames = max(frames)  # frame numbers are 1-based: the last one present ends the video
    picked = grid.indices(num_frames)
    result = ExtractResult(video_id, 'frames', 'extracted', str(out_path), native_fps=fps,
                           frames_total=len(frames), frames_sampled=len(picked))
    with FeatureWriter(out_path, video_id) as writer:
        batcher = _BatchEncoder(encoder, writer, batch_size, result)
        for j in tqdm(picked.tolist(), desc=video_id, unit='frame', leave=False,
                      disable=not progress):
            name = frames.get(j + 1)
            if name is None:
                batcher.skip('missing', f'frame_{j + 1:010d}.jpg', 'no such file')
                continue
            try:
                image = decode_compressed('jpeg', (folder / name).read_bytes())
            except (FrameError, OSError) as exc:
                batcher.skip('corrupt', name, str(exc))
                continue
            batcher.add(j / fps, image, name)
        batcher.flush()
        return _finish(result, writer, encoder, sample_fps, folder, started)


def _container_fps(capture: cv2.VideoCapture) -> float | None:
    value = capture.get(cv2.CAP_PROP_FPS)
    return float(value) if math.isfinite(value) and value > 0 else None


def extract_video_file(video_id: str, path: str | os.PathLike, out_path: str | os.PathLike,
                       encoder: Any, *, sample_fps: float, fps: float | None = None,
                       batch_size: int = 8, progress: bool = True) -> ExtractResult:
    """Encode the sampled frames of one video file into `out_path`.

    Frame rate from the container (`fps` only when the container has none). Frames are
    grabbed in order and only sampled ones decoded; one that fails to decode is skipped and
    counted. DataError if the file cannot be opened or yields no usable frame.
    """
    path, started = Path(path), time.perf_counter()
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise DataError(f'OpenCV cannot open video {path}')
        native = _container_fps(capture) or fps
        if native is None:
            raise DataError(f'video {path} has no frame rate in its container; give --fps')
        grid = SampleGrid(native, sample_fps)
        select = grid.selector()
        expected = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        result = ExtractResult(video_id, 'video', 'extracted', str(out_path), native_fps=native)
        with FeatureWriter(out_path, video_id) as writer:
            batcher = _BatchEncoder(encoder, writer, batch_size, result)
            # A frame whose sampling time lies after it is kept only once a later frame exists.
            pending: tuple[int, np.ndarray | None] | None = None
            bar = tqdm(total=expected if expected > 0 else None, desc=video_id, unit='frame',
                       leave=False, disable=not progress)
            with bar:
                for j in _grabbed(capture):
                    result.frames_total = j + 1
                    bar.update()
                    if pending is not None:
                        _take(batcher, native, *pending)
                        pending = None
                    decision = select(j)
                    if decision is None:
                        continue
                    image = _retrieve_rgb(capture)
                    if decision:
                        _take(batcher, native, j, image)
                    else:
                        pending = (j, image)
            if expected > 0 and result.frames_total < expected:
                _log.warning('%s: read %d frames, the container announced %d (truncated or '
                             'corrupt video?)', video_id, result.frames_total, expected)
            batcher.flush()
            result.frames_sampled = result.frames_encoded + result.frames_skipped
            return _finish(result, writer, encoder, sample_fps, path, started)
    finally:
        capture.release()


def _grabbed(capture: cv2.VideoCapture) -> Iterator[int]:
    """0, 1, 2, ... for each frame grabbed (demuxed, not yet decoded) until the stream ends."""
    j = 0
    while capture.grab():
        yield j
        j += 1


def _retrieve_rgb(capture: cv2.VideoCapture) -> np.ndarray | None:
    """Decode the frame just grabbed as RGB; None if it does not decode."""
    ok, bgr = capture.retrieve()
    if not ok or bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
        return None
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _take(batcher: _BatchEncoder, fps: float, j: int, image: np.ndarray | None) -> None:
    what = f'frame {j}'
    if image is None:
        batcher.skip('corrupt', what, 'OpenCV could not decode it')
    else:
        batcher.add(j / fps, image, what)


def features_up_to_date(path: str | os.PathLike, *, sample_fps: float, backend: str) -> bool:
    """True if `path` is a complete feature file made at `sample_fps` with `backend`."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        features = open_video_features(path)
    except DataError as exc:
        _log.warning('%s will be redone: %s', path, exc)
        return False
    meta = features.metadata
    stored_fps = meta.get('sample_fps')
    return (isinstance(stored_fps, int | float) and abs(stored_fps - sample_fps) < 1e-9
            and meta.get('backend') == backend)


def _existing(source: VideoSource, path: Path) -> ExtractResult:
    meta = open_video_features(path).metadata
    return ExtractResult(
        source.video_id, source.kind, 'existing', str(path), native_fps=meta.get('native_fps'),
        frames_total=int(meta.get('frames_total', 0)),
        frames_sampled=int(meta.get('frames_sampled', 0)),
        frames_encoded=int(meta.get('num_frames', 0)),
        frames_missing=int(meta.get('frames_missing', 0)),
        frames_corrupt=int(meta.get('frames_corrupt', 0)))


def extract_all(sources: Sequence[VideoSource], out_dir: str | os.PathLike, encoder: Any, *,
                sample_fps: float, batch_size: int = 8, overwrite: bool = False,
                progress: bool = True) -> list[ExtractResult]:
    """Extract every source into `<out_dir>/<video_id>.safetensors`; never stops on one video.

    A video whose file is complete and made with the same sample_fps and encoder is skipped
    (status 'existing') unless `overwrite`; a video that fails is reported with status
    'failed' and its message, and the others go on.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for source in tqdm(sources, desc='videos', unit='video', disable=not progress):
        path = out_dir / f'{source.video_id}{FEATURES_SUFFIX}'
        if not overwrite and features_up_to_date(path, sample_fps=sample_fps,
                                                 backend=encoder.name):
            _log.info('%s: up to date, skipped', source.video_id)
            results.append(_existing(source, path))
            continue
        try:
            if source.kind == 'frames':
                if source.fps is None:
                    raise DataError(f'no fps known for frames video {source.video_id}')
                result = extract_frames_dir(source.video_id, source.path, path, encoder,
                                            fps=source.fps, sample_fps=sample_fps,
                                            batch_size=batch_size, progress=progress)
            else:
                result = extract_video_file(source.video_id, source.path, path, encoder,
                                            sample_fps=sample_fps, fps=source.fps,
                                            batch_size=batch_size, progress=progress)
        except MalmmError as exc:  # bad data or an encoder failing on it: the others go on
            _log.error('%s failed: %s', source.video_id, exc)
            result = ExtractResult(source.video_id, source.kind, 'failed', str(path),
                                   message=str(exc))
        results.append(result)
    return results


def write_summary(out_dir: str | os.PathLike, results: Sequence[ExtractResult],
                  info: Mapping[str, Any]) -> Path:
    """extract_summary.json in `out_dir`: the run's settings, per-video counts and totals."""
    totals: dict[str, Any] = {'videos': len(results)}
    for status in ('extracted', 'existing', 'failed'):
        totals[status] = sum(r.status == status for r in results)
    for key in ('frames_sampled', 'frames_encoded', 'frames_missing', 'frames_corrupt',
                'frames_skipped'):
        totals[key] = sum(getattr(r, key) for r in results)
    summary = {'format': SUMMARY_FORMAT, **info, 'totals': totals,
               'videos': [r.to_dict() for r in results]}
    path = Path(out_dir) / SUMMARY_FILE
    try:
        atomic_write(path, json.dumps(summary, indent=2) + '\n')  # never half a summary
    except OSError as exc:
        raise DataError(f'cannot write {path}: {exc.strerror or exc}') from None
    return path
