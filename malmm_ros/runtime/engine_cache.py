"""On-disk cache of serialized TensorRT engines, keyed by everything an engine depends on.

A TensorRT engine only runs with the TensorRT version, GPU (compute capability) and precision it
was built for, and for the exact ONNX bytes it was built from. Each engine is stored next to a
JSON sidecar holding its full key and the sha256 of the engine bytes; an engine is used only when
the sidecar matches the requested key exactly, so a TensorRT/JetPack upgrade or a new GPU gives a
cache miss and a rebuild instead of a crash or silently wrong results. Old engines are reported
(`EngineCache.stale`), never deleted. This module does not import TensorRT.

`ensure_cache_dir` and `malmm_ros.files.atomic_write` serve every backend's cache, the ONNX
export included.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from malmm_ros.errors import CheckpointError, ConfigError, MalmmError
from malmm_ros.files import atomic_write

__all__ = ['CACHE_HINT', 'PRECISIONS', 'EngineCache', 'EngineKey',
           'ensure_cache_dir', 'onnx_sha256']

PRECISIONS = ('fp32', 'fp16', 'int8')
SIDECAR_FORMAT = 1
_CHUNK = 1 << 20  # 1 MiB reads: hashing a large file never holds it in memory at once
_SHA_HEX = re.compile(r'[0-9a-f]{64}')
_CC = re.compile(r'\d+\.\d+')

_log = logging.getLogger(__name__)

T = TypeVar('T')


def _slug(text: str) -> str:
    """Lower-case `text` with every run of characters outside [a-z0-9._] replaced by '-'."""
    return re.sub(r'[^a-z0-9._]+', '-', text.lower()).strip('-._') or 'unknown'


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open('rb') as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized engine depends on: engines are interchangeable iff keys are equal.

    `input_shape` is the largest input the engine accepts (its optimization profile's max), e.g.
    (max_batch, 224, 224, 3). An engine of several inputs (a step graph) lists every input's
    shape in `input_shapes`, in the graph's order; its `input_shape` is the first of them.
    """

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor", e.g. "8.7" for Orin
    precision: str  # one of PRECISIONS
    input_shape: tuple[int, ...]
    # ((input name, shape), ...) of a multi-input engine; () for one input. Optional in the
    # JSON, so the encoder's sidecars read and write as before.
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.onnx_sha256, str) or not _SHA_HEX.fullmatch(self.onnx_sha256):
            raise ConfigError(
                f'engine key: onnx_sha256 must be 64 lower-case hex digits, got '
                f'{self.onnx_sha256!r}'
            )
        for field in ('tensorrt_version', 'gpu_name'):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f'engine key: {field} must be a non-empty string, got {value!r}')
        if not isinstance(self.compute_capability, str) or not _CC.fullmatch(
            self.compute_capability
        ):
            raise ConfigError(
                f'engine key: compute_capability must look like "8.7", got '
                f'{self.compute_capability!r}'
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f'engine key: precision must be one of {list(PRECISIONS)}, got '
                f'{self.precision!r}'
            )
        shape = self.input_shape
        if (
            not isinstance(shape, tuple | list)
            or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise ConfigError(
                f'engine key: input_shape must be a non-empty tuple of positive ints, got '
                f'{shape!r}'
            )
        # JSON gives lists back; a frozen dataclass needs object.__setattr__ to normalise.
        object.__setattr__(self, 'input_shape', tuple(shape))
        object.__setattr__(self, 'input_shapes', _named_shapes(self.input_shapes))
        if self.input_shapes and self.input_shapes[0][1] != self.input_shape:
            raise ConfigError(
                f'engine key: input_shape {self.input_shape} must be the first of input_shapes '
                f'{self.input_shapes[0]}'
            )

    def filename(self, stem: str = 'efficientnet_lite0') -> str:
        """Readable, filesystem-safe engine file name that differs whenever a key field does.

        e.g. ``efficientnet_lite0-3fa2c0d9e1b7-trt10.3.0-nvidia-orin-sm87-fp16-1x224x224x3.engine``
        (the sidecar still holds the full key: slugs and the 12-digit sha prefix are for humans).
        """
        parts = (
            _slug(stem),
            self.onnx_sha256[:12],
            f'trt{_slug(self.tensorrt_version)}',
            _slug(self.gpu_name),
            f'sm{self.compute_capability.replace(".", "")}',
            self.precision,
            'x'.join(str(d) for d in self.input_shape),
        )
        if self.input_shapes:  # every input's name and shape, too many for a name: a digest
            text = json.dumps([[n, list(s)] for n, s in self.input_shapes])
            parts += (f'in{hashlib.sha256(text.encode()).hexdigest()[:10]}',)
        return '-'.join(parts) + '.engine'

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the key (shapes as lists; input_shapes only when there are)."""
        data = dataclasses.asdict(self)
        data['input_shape'] = list(self.input_shape)
        if self.input_shapes:
            data['input_shapes'] = [[name, list(shape)] for name, shape in self.input_shapes]
        else:
            del data['input_shapes']
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineKey:
        """Inverse of `to_dict`; CheckpointError when fields are missing or unexpected."""
        if not isinstance(data, Mapping):
            raise CheckpointError(f'engine key must be a JSON object, got {type(data).__name__}')
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data) - {'input_shapes'})
        unexpected = sorted(set(data) - names)
        if missing or unexpected:
            raise CheckpointError(
                f'engine key fields do not match: missing {missing}, unexpected {unexpected}'
            )
        shape = data['input_shape']
        return cls(**{**data, 'input_shape': tuple(shape) if isinstance(shape, list) else shape})

    def differences(self, other: EngineKey) -> list[str]:
        """'field: other -> self' for every field that differs (for log messages)."""
        return [
            f'{f.name}: {getattr(other, f.name)!r} -> {getattr(self, f.name)!r}'
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def _named_shapes(value: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """`value` ((name, shape) pairs, lists from JSON too) as tuples; ConfigError if malformed."""
    try:
        pairs = tuple((name, tuple(shape)) for name, shape in value)
    except (TypeError, ValueError):
        pairs = None
    names = [name for name, _ in pairs or ()]
    if pairs is None or not all(isinstance(n, str) and n for n in names) or \
            len(set(names)) != len(names) or not all(
                all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
                for _, shape in pairs):
        raise ConfigError(
            f'engine key: input_shapes must be (unique name, shape of positive ints) pairs, got '
            f'{value!r}'
        )
    return pairs


def onnx_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of an ONNX file, read in chunks; CheckpointError if it is missing.

    Only the .onnx file is hashed: external-data weight files next to it are not covered.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'ONNX file {path} does not exist')
    try:
        return _sha256_file(path)
    except OSError as exc:
        raise CheckpointError(f'ONNX file {path} could not be read: {exc}') from exc


CACHE_HINT = 'set engine_dir or $MALMM_ENGINE_DIR to a writable folder'


def _cache_dir_error(directory: Path, action: str, reason: str) -> ConfigError:
    """The one-line error for an encoder cache folder that cannot be used (names it, says why)."""
    return ConfigError(
        f'engine_dir {directory}: cannot {action} the encoder cache ({reason}); {CACHE_HINT}'
    )


def ensure_cache_dir(directory: str | os.PathLike[str]) -> Path:
    """`directory` as an absolute path, created with its parents if missing.

    ConfigError naming it and the reason when it cannot be created (a parent is a file,
    permission denied, read-only file system), is not a folder or cannot be read, so a bad
    engine_dir is one line at start-up rather than a traceback or a failure after a long build.
    Writing is not required: a read-only cache that already holds what is needed still works.
    """
    path = Path(directory).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir(exist_ok=True) raises it only for a non-folder
        raise _cache_dir_error(path, 'use', 'it exists and is not a folder') from None
    except OSError as exc:
        raise _cache_dir_error(path, 'create', exc.strerror or str(exc)) from None
    if not os.access(path, os.R_OK | os.X_OK):
        raise _cache_dir_error(path, 'read', 'permission denied')
    return path


class EngineCache:
    """A folder of `key.filename()` engines, each with a `<name>.json` sidecar holding its key."""

    def __init__(self, directory: str | os.PathLike[str], *, stem: str = 'efficientnet_lite0'):
        self.directory = Path(directory).expanduser()
        self.stem = stem

    def paths(self, key: EngineKey) -> tuple[Path, Path]:
        """(engine file, sidecar file) for `key`; the sidecar is the engine name + '.json'."""
        engine = self.directory / key.filename(self.stem)
        return engine, engine.with_name(engine.name + '.json')

    def _read_sidecar(self, sidecar: Path) -> tuple[EngineKey, dict[str, Any]]:
        """Parsed (key, sidecar dict); raises OSError, ValueError or MalmmError when unusable."""
        data = json.loads(sidecar.read_text(encoding='utf-8'))
        if not isinstance(data, dict) or 'key' not in data:
            raise CheckpointError('no "key" object in it')
        return EngineKey.from_dict(data['key']), data

    def lookup(self, key: EngineKey) -> Path | None:
        """The cached engine for exactly `key`, or None (logging why a present one is unusable)."""
        engine, sidecar = self.paths(key)
        if not engine.is_file():
            _log.debug('no cached engine %s', engine)
            return None
        if not sidecar.is_file():
            _log.warning('engine %s has no sidecar %s: not using it', engine, sidecar.name)
            return None
        try:
            stored_key, data = self._read_sidecar(sidecar)
        except (OSError, ValueError, MalmmError) as exc:  # JSONDecodeError is a ValueError
            _log.warning('engine sidecar %s is unreadable (%s): not using %s',
                         sidecar, exc, engine.name)
            return None
        if stored_key != key:
            _log.warning('engine %s was built for another configuration (%s): not using it',
                         engine, '; '.join(key.differences(stored_key)))
            return None
        try:
            same_size = data.get('engine_size') == engine.stat().st_size
            if not same_size or data.get('engine_sha256') != _sha256_file(engine):
                _log.warning('engine %s does not match the size/sha256 in its sidecar '
                             '(changed or truncated since it was stored): not using it', engine)
                return None
        except OSError as exc:
            _log.warning('engine %s could not be read (%s): not using it', engine, exc)
            return None
        return engine

    def store(
        self, key: EngineKey, engine_bytes: bytes, info: Mapping[str, Any] | None = None
    ) -> Path:
        """Write the engine, then its sidecar (key, created time, build `info`), each atomically.

        The old sidecar goes first, so a crash part-way leaves an engine without a sidecar (a
        cache miss), never a sidecar that vouches for the wrong engine.
        """
        data = bytes(engine_bytes)
        engine, sidecar = self.paths(key)
        record = {
            'format': SIDECAR_FORMAT,
            'key': key.to_dict(),
            'created': datetime.now(timezone.utc).isoformat(timespec='seconds'),
            'engine_size': len(data),
            'engine_sha256': hashlib.sha256(data).hexdigest(),
            'build': dict(info or {}),
        }
        # default=str: build info is for people reading the file; never fail a store over it.
        text = json.dumps(record, indent=2, sort_keys=True, default=str) + '\n'
        self.directory.mkdir(parents=True, exist_ok=True)
        sidecar.unlink(missing_ok=True)
        atomic_write(engine, data)
        atomic_write(sidecar, text.encode('utf-8'))
        _log.info('stored engine %s (%.1f MB)', engine, len(data) / 1e6)
        return engine

    def load_or_build(
        self,
        key: EngineKey,
        build: Callable[[], bytes],
        deserialize: Callable[[bytes], T | None],
        *,
        info: Mapping[str, Any] | None = None,
    ) -> T:
        """The deserialized cached engine for `key`, else build, deserialize and store a new one.

        A cached engine that fails to deserialize (raises or returns None) is rebuilt once and
        replaced. A failing build raises CheckpointError with the cause (MalmmErrors, e.g. a
        ConfigError from the builder, pass through); an engine that cannot be written to the
        cache is still used, with a warning.
        """
        engine_path = self.lookup(key)
        if engine_path is not None:
            loaded = self._try_deserialize(engine_path, deserialize)
            if loaded is not None:
                _log.info('using cached engine %s', engine_path)
                return loaded
            _log.warning('engine %s failed to deserialize (stale or corrupt): rebuilding',
                         engine_path)
        name = key.filename(self.stem)
        _log.info('building engine %s (can take minutes; cached afterwards)', name)
        started = time.monotonic()
        try:
            data = build()
        except MalmmError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f'building engine {name} failed: {type(exc).__name__}: {exc}'
            ) from exc
        if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
            raise CheckpointError(f'building engine {name} produced no engine bytes')
        data = bytes(data)
        _log.info('built engine %s in %.1f s', name, time.monotonic() - started)
        try:
            loaded = deserialize(data)
        except Exception as exc:
            raise CheckpointError(
                f'freshly built engine {name} failed to deserialize: {type(exc).__name__}: {exc}'
            ) from exc
        if loaded is None:
            raise CheckpointError(f'freshly built engine {name} failed to deserialize')
        try:
            self.store(key, data, info)
        except OSError as exc:
            _log.warning('could not cache engine in %s (%s): using it uncached, it will be '
                         'rebuilt next start', self.directory, exc)
        return loaded

    def _try_deserialize(self, path: Path, deserialize: Callable[[bytes], T | None]) -> T | None:
        try:
            return deserialize(path.read_bytes())
        except Exception as exc:  # a stale or corrupt engine can fail in any way
            _log.warning('deserializing %s raised %s: %s', path, type(exc).__name__, exc)
            return None

    def stale(self, key: EngineKey) -> list[Path]:
        """Cached engines of the same ONNX built for another TensorRT version, GPU or precision.

        Only reported (e.g. "found N stale engines"); deleting them is left to the user.
        """
        if not self.directory.is_dir():
            return []
        found = []
        for sidecar in sorted(self.directory.glob('*.engine.json')):
            engine = sidecar.with_name(sidecar.name.removesuffix('.json'))
            if not engine.is_file():
                continue
            try:
                other, _ = self._read_sidecar(sidecar)
            except (OSError, ValueError, MalmmError) as exc:
                _log.debug('skipping unreadable sidecar %s: %s', sidecar, exc)
                continue
            if other.onnx_sha256 != key.onnx_sha256:
                continue
            if (other.tensorrt_version, other.gpu_name, other.compute_capability,
                    other.precision) != (key.tensorrt_version, key.gpu_name,
                                         key.compute_capability, key.precision):
                found.append(engine)
        return sorted(found)
