"""The encoder's ONNX files without torch: interface names, the cache folder, cached graphs.

A robot runs the encoder from ONNX files alone, so nothing here imports torch (nor onnx, which
the runtime requirements leave out): the torch exporter (`onnx_export`) and the quantizer
(`quantize`) are imported only when a cached graph is missing or corrupt and has to be made.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

from malmm_ros.errors import CheckpointError, ConfigError
from malmm_ros.runtime.engine_cache import CACHE_HINT, ensure_cache_dir

__all__ = ['FP32_EXPORT', 'INPUT_NAME', 'INT8_ONNX_FILENAME', 'ONNX_FILENAME', 'OUTPUT_NAME',
           'CachedGraph', 'default_engine_dir', 'ensure_onnx', 'open_onnx']

# The graph's interface: uint8 RGB frames [B, 224, 224, 3] in, float32 tokens [B, 49, 1280] out.
INPUT_NAME = 'frames'
OUTPUT_NAME = 'tokens'
ONNX_FILENAME = 'efficientnet_lite0.onnx'
INT8_ONNX_FILENAME = 'efficientnet_lite0.int8.onnx'

_log = logging.getLogger(__name__)

T = TypeVar('T')


class CachedGraph(NamedTuple):
    """A graph the cache makes on first use, and the words its log lines use for it."""

    filename: str
    make: Callable[[Path], object]  # writes the graph to the path it is given, atomically
    noun: str  # 'export': "cached ONNX export ... failed to load"
    verb: str  # 'exporting': "... exporting it again"


def _export(path: Path) -> None:
    from malmm_ros.runtime.onnx_export import export_onnx  # torch: only to make the file

    export_onnx(path)


FP32_EXPORT = CachedGraph(ONNX_FILENAME, _export, 'export', 'exporting')


def default_engine_dir() -> Path:
    """Where exported and compiled encoders are cached.

    $MALMM_ENGINE_DIR if set; else the repository's engines/ folder in a source checkout; else
    ~/.cache/malmm_ros/engines (an installed package cannot write its share folder).
    """
    if os.environ.get('MALMM_ENGINE_DIR'):
        return Path(os.environ['MALMM_ENGINE_DIR'])
    checkout = Path(__file__).resolve().parents[2] / 'engines'
    if checkout.is_dir() and os.access(checkout, os.W_OK):
        return checkout
    return Path.home() / '.cache' / 'malmm_ros' / 'engines'


def _one_line(exc: BaseException) -> str:
    """`exc` as one line (ONNX Runtime and onnx messages can span several)."""
    return ' '.join(str(exc).split()) or type(exc).__name__


def open_onnx(onnx_path: str | os.PathLike | None, engine_dir: str | os.PathLike | None,
              load: Callable[[Path], T], cached: CachedGraph = FP32_EXPORT) -> tuple[Path, T]:
    """(path, load(path)) for the user's ONNX file `onnx_path`, else for the `cached` graph.

    The cached graph lives in `engine_dir` (default: `default_engine_dir()`) and is made on
    first use. A cached file that `load` rejects (truncated, garbage, empty) is made again once,
    atomically, and loaded again, as a TensorRT engine that fails to deserialize is rebuilt. A
    user's file is never overwritten: a failure to load it is a CheckpointError naming it.
    `load` may raise anything for a file it cannot use.
    """
    if onnx_path:
        path = Path(onnx_path)
        if not path.is_file():
            raise CheckpointError(f'ONNX file {path} does not exist (export it with '
                                  '`malmm-export onnx --out PATH`)')
        try:
            return path, load(path)
        except Exception as exc:  # a bad file fails in the loader's own exception types
            raise CheckpointError(f'cannot load ONNX file {path} (given as onnx_path, so not '
                                  f're-exported): {_one_line(exc)}') from None
    directory = ensure_cache_dir(engine_dir or default_engine_dir())
    path = directory / cached.filename
    first_failure = None
    if path.is_file():
        try:
            return path, load(path)
        except Exception as exc:
            first_failure = _one_line(exc)
            _log.warning('cached ONNX %s %s failed to load (%s): %s it again', cached.noun, path,
                         first_failure, cached.verb)
    else:
        _log.info('no cached ONNX %s at %s: %s it once (seconds)', cached.noun, path,
                  cached.verb)
    try:
        cached.make(path)
    except ConfigError as exc:  # only a write failure: say which setting to change
        raise ConfigError(f'{exc}; {CACHE_HINT}') from None
    try:
        return path, load(path)
    except Exception as exc:
        earlier = (f'; before it was made again it failed with: {first_failure}'
                   if first_failure else '')
        raise CheckpointError(f'cannot load freshly made ONNX {cached.noun} {path}: '
                              f'{_one_line(exc)}{earlier}') from None


def _check_onnx(path: Path) -> None:
    import onnx  # a dev-machine package: the runtime requirements leave it out

    onnx.checker.check_model(str(path))  # parses the file: raises for truncated or garbage bytes


def ensure_onnx(onnx_path: str | os.PathLike | None = None,
                engine_dir: str | os.PathLike | None = None) -> Path:
    """The encoder's ONNX file, checked with onnx.checker: `onnx_path`, or the export cached in
    `engine_dir` (exported on first use, exported again once if the cached file is corrupt)."""
    return open_onnx(onnx_path, engine_dir, _check_onnx)[0]
