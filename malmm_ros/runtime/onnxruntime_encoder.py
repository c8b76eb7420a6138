"""The ONNX Runtime encoder backend: the CPU default, CUDA/TensorRT providers when present.

Runs without torch when it is given its ONNX file (a bundle's encoder): torch is imported only
to export (or repair) a cached fp32 graph, and only when that has to happen.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from malmm_ros.errors import ConfigError, FrameError
from malmm_ros.imaging import IMAGE_SIZE
from malmm_ros.runtime.onnx_files import (
    INPUT_NAME,
    INT8_ONNX_FILENAME,
    CachedGraph,
    ensure_onnx,
    open_onnx,
)
from malmm_ros.runtime.ort_session import checked_providers, session_options

# ensure_onnx lives in onnx_files; it stays importable from here for existing callers.
__all__ = ['PRECISIONS', 'OnnxRuntimeEncoder', 'ensure_onnx']

PRECISIONS = ('fp32', 'int8')


def _quantize_cached_export(path: Path) -> None:
    """The cached INT8 graph: the fp32 export beside it (exported first if missing) quantized on
    the default calibration set (the package's sample photos)."""
    from malmm_ros.runtime.quantize import default_calibration_frames, quantize_encoder

    quantize_encoder(ensure_onnx(None, path.parent), path, default_calibration_frames())


INT8_QUANTIZATION = CachedGraph(INT8_ONNX_FILENAME, _quantize_cached_export, 'INT8 graph',
                                'quantizing')


class OnnxRuntimeEncoder:
    """uint8 RGB frames [B, 224, 224, 3] -> float32 tokens [B, 49, 1280] with ONNX Runtime.

    The graph is `onnx_path` (fp32 or INT8, as `precision` says), or the one cached in
    `engine_dir` (default: `default_engine_dir()`), made on first use and made again once if
    ONNX Runtime cannot load it: the fp32 export, or for int8 that export quantized on the
    package's sample photos.
    """

    def __init__(self, onnx_path: str | os.PathLike | None = None, *,
                 engine_dir: str | os.PathLike | None = None, threads: int = 0,
                 providers: list[str] | None = None, spinning: bool = False,
                 precision: str = 'fp32') -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f'ONNX Runtime encoder precision must be one of '
                              f'{list(PRECISIONS)}, got {precision!r}')
        options = session_options(threads, spinning=spinning)
        providers = checked_providers(providers)

        def open_session(path: Path) -> ort.InferenceSession:
            return ort.InferenceSession(str(path), options, providers=providers)

        if precision == 'int8':
            self.path, self.session = open_onnx(onnx_path, engine_dir, open_session,
                                                INT8_QUANTIZATION)
        else:
            self.path, self.session = open_onnx(onnx_path, engine_dir, open_session)
        self.precision = precision
        self.providers = self.session.get_providers()
        kind = self.providers[0].removesuffix('ExecutionProvider').lower()
        self.name = f'onnxruntime-{kind}' + ('-int8' if precision == 'int8' else '')

    def run(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [B, 224, 224, 3] RGB -> float32 tokens [B, 49, 1280]."""
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (
                IMAGE_SIZE, IMAGE_SIZE, 3):
            raise FrameError(f'expected uint8 frames [B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3], got '
                             f'{frames.dtype} {frames.shape}')
        return self.session.run(None, {INPUT_NAME: np.ascontiguousarray(frames)})[0]
