"""Image encoder backends behind one interface: `.name` and `.run(frames) -> tokens`.

frames: uint8 RGB [B, 224, 224, 3] (resized and cropped); tokens: float32 [B, 49, 1280], the
same values whatever the backend (within each backend's precision).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Protocol

import numpy as np

from malmm_ros.errors import ConfigError

__all__ = ['BACKENDS', 'EncoderRunner', 'create_encoder']

BACKENDS = ('onnxruntime', 'torch', 'tensorrt', 'auto')
_log = logging.getLogger(__name__)


class EncoderRunner(Protocol):
    name: str

    def run(self, frames: np.ndarray) -> np.ndarray: ...


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # a torch-free install (requirements-runtime.txt): no torch CUDA either
        return False
    return torch.cuda.is_available()


def create_encoder(backend: str, *, device: str = 'cpu', threads: int = 0,
                   precision: str = 'fp16', engine_dir: str | os.PathLike | None = None,
                   onnx_path: str | os.PathLike | None = None,
                   calibration_frames: Iterable[np.ndarray] | None = None) -> EncoderRunner:
    """An encoder runner for `backend`.

    `auto` picks, in order: TensorRT (importable and a CUDA GPU), ONNX Runtime with CUDA, torch
    on CUDA, ONNX Runtime on the CPU; it logs what it chose and why. `engine_dir` (default:
    `default_engine_dir()`) caches the ONNX export and TensorRT engines; the torch backend needs
    no files and ignores it. A cache folder that cannot be created or read is a ConfigError.
    `precision`: fp32, fp16 or int8 for TensorRT (auto: fp16); int8 or fp32 (anything else)
    for ONNX Runtime.
    `calibration_frames`: uint8 [224, 224, 3] frames a TensorRT int8 engine is calibrated on.
    """
    if backend not in BACKENDS:
        raise ConfigError(f'unknown encoder backend {backend!r}; choose one of {list(BACKENDS)}')
    if backend == 'auto':
        backend, device, why = _choose(device)
        _log.info('encoder backend auto -> %s (%s)', backend, why)
    if backend == 'torch':
        from malmm_ros.runtime.torch_encoder import TorchEncoder

        return TorchEncoder(device, threads=threads)
    if backend == 'onnxruntime':
        from malmm_ros.runtime.onnxruntime_encoder import OnnxRuntimeEncoder

        providers = (['CUDAExecutionProvider', 'CPUExecutionProvider'] if device == 'cuda'
                     else ['CPUExecutionProvider'])
        # fp16 (the TensorRT default) and auto mean fp32 here: ONNX Runtime runs fp32 or int8.
        return OnnxRuntimeEncoder(onnx_path, engine_dir=engine_dir, threads=threads,
                                  providers=providers,
                                  precision='int8' if precision == 'int8' else 'fp32')
    from malmm_ros.runtime.onnx_files import default_engine_dir, ensure_onnx
    from malmm_ros.runtime.tensorrt_encoder import TensorRTEncoder, tensorrt_available

    if precision == 'auto':  # backend auto chose TensorRT: its default precision
        precision = 'fp16'

    available, why = tensorrt_available()
    if not available:
        raise ConfigError(f'backend tensorrt needs the tensorrt package and a CUDA GPU '
                          f'(pip install .[tensorrt]): {why}')
    return TensorRTEncoder(ensure_onnx(onnx_path, engine_dir),
                           cache_dir=engine_dir or default_engine_dir(), precision=precision,
                           calibration_frames=calibration_frames)


def _choose(device: str) -> tuple[str, str, str]:
    """(backend, device, reason) for `auto`."""
    from malmm_ros.runtime.tensorrt_encoder import tensorrt_available

    available, why_not = tensorrt_available()
    if available:
        return 'tensorrt', 'cuda', 'TensorRT and a CUDA GPU are present'
    import onnxruntime as ort

    if 'CUDAExecutionProvider' in ort.get_available_providers() and _cuda_available():
        return 'onnxruntime', 'cuda', f'no TensorRT ({why_not}); ONNX Runtime has CUDA'
    if _cuda_available():
        return 'torch', 'cuda', f'no TensorRT ({why_not}); torch sees a CUDA GPU'
    return 'onnxruntime', 'cpu', f'no TensorRT ({why_not}) and no CUDA GPU: CPU'
