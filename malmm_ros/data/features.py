"""Per-video encoder features on disk: one safetensors file per video.

`<dir>/<video_id>.safetensors` holds
- `tokens`  float16 [T, P, C]: the encoder tokens of T sampled frames (P = 49, C = 1280 for
  EfficientNet-Lite0), exactly what the node's encoder produces for those frames;
- `times_s` float64 [T]: each frame's time in seconds from the video start, strictly ascending;
and JSON metadata under the header key 'malmm_ros' (format 'malmm_ros/features/v1', video_id,
backend, sample_fps, source, native_fps, frames_sampled, frames_skipped, complete, ...).

Files are written in one pass with bounded memory (`FeatureWriter`: tokens stream to disk, the
header is filled in at the end) and appear atomically (temporary file + os.replace), so a crash
never leaves a half file under the final name. Reading is lazy: `VideoFeatures.tokens(indices)`
reads only the requested frames, so a training window never loads an hour of video.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
from safetensors import SafetensorError, safe_open

from malmm_ros.errors import DataError
from malmm_ros.files import json_metadata

__all__ = [
    'FEATURES_FORMAT',
    'FEATURES_SUFFIX',
    'PARTIAL_SUFFIX',
    'TIME_TOLERANCE_S',
    'FeatureStore',
    'FeatureWriter',
    'VideoFeatures',
    'open_video_features',
    'write_video_features',
]

FEATURES_FORMAT = 'malmm_ros/features/v1'
FEATURES_SUFFIX = '.safetensors'
PARTIAL_SUFFIX = '.partial'
_HEADER_KEY = 'malmm_ros'
# Room kept for the safetensors JSON header in front of the streamed tokens. The header is a
# few hundred bytes of shapes plus our metadata; 16 KiB (data then starts 8-byte aligned)
# leaves ample room and costs nothing next to 125 KB of tokens per frame.
_HEADER_RESERVE = 16384 - 8
# A requested time within this of a frame's time counts as "at" the frame: float rounding of
# times computed elsewhere (ts - ta) must not hide the frame, and no real camera runs at 1 MHz.
TIME_TOLERANCE_S = 1e-6
# Metadata keys the writer owns; a caller's values for them would contradict the file.
_RESERVED_KEYS = ('format', 'video_id', 'num_frames', 'num_tokens', 'feature_dim', 'complete')


def _check_video_id(video_id: object) -> str:
    if not isinstance(video_id, str) or not video_id or video_id.strip() != video_id \
            or any(sep in video_id for sep in ('/', '\\', '\0')) or video_id in ('.', '..'):
        raise DataError(f'video_id must be a non-empty file-name-safe string, got {video_id!r}')
    return video_id


class FeatureWriter:
    """Write one video's feature file batch by batch, in memory bounded by one batch.

    with FeatureWriter(path, 'P01_01') as writer:
        writer.append(times_s, tokens)     # any number of times, times strictly ascending
        writer.commit(metadata={...})      # the file appears under `path` only now

    Leaving the block without commit() (or with an exception) deletes the temporary file.
    """

    def __init__(self, path: str | os.PathLike, video_id: str) -> None:
        self.path = Path(path)
        self.video_id = _check_video_id(video_id)
        self._tmp = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self._times: list[np.ndarray] = []
        self._count = 0
        self._shape: tuple[int, int] | None = None  # (P, C) of the first batch
        self._last_time = -math.inf
        try:
            # Closed by commit() or abort(); the context manager guarantees one of them runs.
            self._file: BinaryIO | None = open(self._tmp, 'wb')
            self._file.write(b'\0' * (8 + _HEADER_RESERVE))  # header placeholder
        except OSError as exc:
            raise DataError(f'cannot write feature file {self._tmp}: {exc.strerror or exc}'
                            ) from None

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._file is not None:
            self.abort()

    def __len__(self) -> int:
        return self._count

    def append(self, times_s: Sequence[float] | np.ndarray, tokens: np.ndarray) -> None:
        """Add frames: times [B] in seconds (ascending, after every earlier frame), tokens
        [B, P, C] (any float dtype; stored as float16)."""
        if self._file is None:
            raise DataError(f'feature file {self.path}: writer is closed')
        times = np.asarray(times_s, dtype=np.float64)
        tokens = np.asarray(tokens)
        where = f'feature file {self.path}'
        if times.ndim != 1:
            raise DataError(f'{where}: times_s must be 1-D, got shape {times.shape}')
        if tokens.ndim != 3 or tokens.shape[0] != times.shape[0] or 0 in tokens.shape[1:]:
            raise DataError(f'{where}: tokens must be [T, P, C] with T = len(times_s) = '
                            f'{times.shape[0]}, got shape {tokens.shape}')
        if not np.issubdtype(tokens.dtype, np.floating):
            raise DataError(f'{where}: tokens must be floating point, got {tokens.dtype}')
        if self._shape is not None and tokens.shape[1:] != self._shape:
            raise DataError(f'{where}: tokens of shape {tokens.shape[1:]} per frame after '
                            f'{self._shape}')
        if times.size == 0:
            return
        if not np.all(np.isfinite(times)) or times[0] < 0:
            raise DataError(f'{where}: times_s must be finite and >= 0, got {times[:5]}...')
        steps = np.diff(np.concatenate([[self._last_time], times]))
        if np.any(steps <= 0):
            bad = int(np.argmax(steps <= 0))
            raise DataError(f'{where}: times_s must be strictly ascending; frame '
                            f'{self._count + bad} at {times[bad]} s is not after the previous '
                            'frame')
        with np.errstate(over='ignore'):  # overflow becomes inf, refused just below
            half = tokens.astype(np.float16)
        if not np.all(np.isfinite(half)):
            raise DataError(f'{where}: tokens hold NaN or values beyond float16 range')
        try:
            self._file.write(np.ascontiguousarray(half).astype('<f2', copy=False).tobytes())
        except OSError as exc:
            raise DataError(f'cannot write feature file {self._tmp}: {exc.strerror or exc}'
                            ) from None
        self._shape = tokens.shape[1:]
        self._times.append(times)
        self._count += times.shape[0]
        self._last_time = float(times[-1])

    def commit(self, *, metadata: Mapping[str, Any]) -> Path:
        """Finish the file with `metadata` (JSON-serializable) and move it to `path`."""
        if self._file is None:
            raise DataError(f'feature file {self.path}: writer is closed')
        if self._count == 0 or self._shape is None:
            self.abort()
            raise DataError(f'feature file {self.path}: no frames to write')
        clashes = sorted(k for k in _RESERVED_KEYS if k in metadata)
        if clashes:
            self.abort()
            raise DataError(f'feature file {self.path}: metadata keys {clashes} are set by '
                            'the writer')
        num_tokens, feature_dim = self._shape
        info = {'format': FEATURES_FORMAT, 'video_id': self.video_id,
                'num_frames': self._count, 'num_tokens': num_tokens,
                'feature_dim': feature_dim, **metadata, 'complete': True}
        tokens_bytes = self._count * num_tokens * feature_dim * 2
        header = {
            '__metadata__': {_HEADER_KEY: self._json(info)},
            'tokens': {'dtype': 'F16', 'shape': [self._count, num_tokens, feature_dim],
                       'data_offsets': [0, tokens_bytes]},
            'times_s': {'dtype': 'F64', 'shape': [self._count],
                        'data_offsets': [tokens_bytes, tokens_bytes + 8 * self._count]},
        }
        text = json.dumps(header, separators=(',', ':')).encode('utf-8')
        if len(text) > _HEADER_RESERVE:
            self.abort()
            raise DataError(f'feature file {self.path}: metadata too large ({len(text)} bytes '
                            f'of header, at most {_HEADER_RESERVE})')
        file = self._file
        try:
            file.write(np.concatenate(self._times).astype('<f8').tobytes())
            file.seek(0)
            file.write(_HEADER_RESERVE.to_bytes(8, 'little'))
            file.write(text.ljust(_HEADER_RESERVE, b' '))  # safetensors allows space padding
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the name says it is complete
            file.close()
            self._file = None
            os.replace(self._tmp, self.path)
        except OSError as exc:
            self.abort()
            raise DataError(f'cannot write feature file {self.path}: {exc.strerror or exc}'
                            ) from None
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; the final path is left untouched."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def _json(self, info: dict[str, Any]) -> str:
        try:
            return json.dumps(info, allow_nan=False)
        except (TypeError, ValueError) as exc:
            self.abort()
            raise DataError(f'feature file {self.path}: metadata is not JSON-serializable '
                            f'({exc})') from None


def write_video_features(path: str | os.PathLike, video_id: str,
                         times_s: Sequence[float] | np.ndarray, tokens: np.ndarray, *,
                         metadata: Mapping[str, Any]) -> Path:
    """Write a whole video's features at once (atomically); tokens [T, P, C] stored as fp16."""
    times = np.asarray(times_s, dtype=np.float64)
    if times.ndim != 1 or times.size == 0:
        raise DataError(f'feature file {path}: times_s must be a non-empty 1-D array, got '
                        f'shape {times.shape}')
    with FeatureWriter(path, video_id) as writer:
        writer.append(times, tokens)
        return writer.commit(metadata=metadata)


class VideoFeatures:
    """One video's feature file, opened and checked; tokens are read lazily on request."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        where = f'feature file {self.path}'
        if not self.path.is_file():
            raise DataError(f'{where} does not exist')
        try:
            with safe_open(str(self.path), framework='np') as handle:
                header = handle.metadata() or {}
                names = set(handle.keys())
                if names != {'tokens', 'times_s'}:
                    raise DataError(f'{where}: expected tensors tokens and times_s, found '
                                    f'{sorted(names)}')
                tokens = handle.get_slice('tokens')
                shape, dtype = tuple(tokens.get_shape()), tokens.get_dtype()
                times = handle.get_tensor('times_s')
        except (SafetensorError, OSError, ValueError) as exc:
            raise DataError(f'{where} is not a readable safetensors file ({exc})') from None
        metadata = json_metadata(header, key=_HEADER_KEY, expected_format=FEATURES_FORMAT,
                                 where=where, error=DataError,
                                 missing='not a feature file written by malmm_ros (malmm-extract)')
        if metadata.get('complete') is not True:
            raise DataError(f'{where} is not marked complete')
        if dtype != 'F16' or len(shape) != 3 or 0 in shape:
            raise DataError(f'{where}: tokens must be float16 [T, P, C], found {dtype} {shape}')
        if times.dtype != np.float64 or times.shape != (shape[0],):
            raise DataError(f'{where}: times_s must be float64 [{shape[0]}], found {times.dtype} '
                            f'{times.shape}')
        if not np.all(np.isfinite(times)) or np.any(np.diff(times) <= 0) or times[0] < 0:
            raise DataError(f'{where}: times_s must be finite, >= 0 and strictly ascending')
        video_id = metadata.get('video_id')
        if not isinstance(video_id, str) or not video_id:
            raise DataError(f'{where}: metadata has no video_id')
        if metadata.get('num_frames') != shape[0]:
            raise DataError(f'{where}: metadata says {metadata.get("num_frames")!r} frames, '
                            f'tokens hold {shape[0]}')
        times.flags.writeable = False  # shared with every caller
        self.metadata: dict[str, Any] = metadata
        self.video_id: str = video_id
        self.times_s: np.ndarray = times
        self.num_tokens: int = int(shape[1])
        self.feature_dim: int = int(shape[2])

    def __len__(self) -> int:
        return int(self.times_s.shape[0])

    def __repr__(self) -> str:
        return (f'VideoFeatures({self.video_id!r}, {len(self)} frames, '
                f'{self.metadata.get("backend")}, {self.path})')

    def tokens(self, indices: Iterable[int] | np.ndarray) -> np.ndarray:
        """float32 [len(indices), P, C] tokens of the given frame indices, in the given order.

        Reads only those frames (contiguous runs at once). Indices must be in 0..len-1: a -1
        from `indices_at` means "no frame yet" and is refused rather than read as the last
        frame (which would peek into the future).
        """
        wanted = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices))
        if wanted.size == 0:
            return np.empty((0, self.num_tokens, self.feature_dim), np.float32)
        if wanted.ndim != 1 or not np.issubdtype(wanted.dtype, np.integer):
            raise IndexError(f'{self.path}: indices must be a 1-D sequence of integers, got '
                             f'shape {wanted.shape} dtype {wanted.dtype}')
        if wanted.min() < 0 or wanted.max() >= len(self):
            bad = wanted[(wanted < 0) | (wanted >= len(self))][0]
            raise IndexError(f'{self.path}: frame index {bad} out of range 0..{len(self) - 1}')
        unique, inverse = np.unique(wanted, return_inverse=True)
        # Split the sorted unique indices into runs of consecutive frames: one read per run.
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        parts = []
        try:
            with safe_open(str(self.path), framework='np') as handle:
                view = handle.get_slice('tokens')
                for run in np.split(unique, breaks):
                    parts.append(view[int(run[0]):int(run[-1]) + 1])
        except (SafetensorError, OSError, ValueError) as exc:
            raise DataError(f'feature file {self.path}: cannot read tokens ({exc})') from None
        block = np.concatenate(parts).astype(np.float32)  # [len(unique), P, C]
        return block[inverse.reshape(-1)]

    def indices_at(self, times_s: Sequence[float] | np.ndarray | float) -> np.ndarray:
        """For each time, the index of the latest frame at or before it; -1 if none.

        Never a frame after the requested time (anticipation must not peek), up to
        TIME_TOLERANCE_S of float rounding.
        """
        query = np.asarray(times_s, dtype=np.float64)
        if np.any(np.isnan(query)):
            raise ValueError(f'{self.path}: NaN in requested times')
        found = np.searchsorted(self.times_s, query + TIME_TOLERANCE_S, side='right') - 1
        return found.astype(np.int64)


def open_video_features(path: str | os.PathLike) -> VideoFeatures:
    """Open and check one feature file; DataError naming the file if it is not one."""
    return VideoFeatures(path)


class FeatureStore:
    """A folder of `<video_id>.safetensors` feature files (what malmm-extract writes)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise DataError(f'feature folder {self.directory} does not exist or is not a folder')
        self._open: dict[str, VideoFeatures] = {}

    def __repr__(self) -> str:
        return f'FeatureStore({str(self.directory)!r})'

    def path(self, video_id: str) -> Path:
        return self.directory / f'{_check_video_id(video_id)}{FEATURES_SUFFIX}'

    def video_ids(self) -> list[str]:
        """Sorted ids of the complete feature files (temporary .partial files are ignored)."""
        return sorted(p.name.removesuffix(FEATURES_SUFFIX)
                      for p in self.directory.glob(f'*{FEATURES_SUFFIX}') if p.is_file())

    def __contains__(self, video_id: object) -> bool:
        return isinstance(video_id, str) and self.path(video_id).is_file()

    def open(self, video_id: str) -> VideoFeatures:
        """The video's features (cached); DataError if missing, malformed or for another video."""
        cached = self._open.get(video_id)
        if cached is not None:
            return cached
        path = self.path(video_id)
        if not path.is_file():
            raise DataError(f'no features for video {video_id!r}: {path} does not exist '
                            '(run malmm-extract for it)')
        features = VideoFeatures(path)
        if features.video_id != video_id:
            raise DataError(f'feature file {path} holds video {features.video_id!r}, not '
                            f'{video_id!r}')
        self._open[video_id] = features
        return features

    def metadata(self, video_id: str) -> dict[str, Any]:
        return self.open(video_id).metadata
