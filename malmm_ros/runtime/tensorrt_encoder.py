"""The TensorRT encoder backend: the ONNX export of EfficientNet-Lite0 as a TensorRT 10 engine.

The engine is built once per (ONNX bytes, TensorRT version, GPU, precision, max batch) and kept in
an `EngineCache`, so a TensorRT/JetPack upgrade triggers a rebuild instead of loading a stale
engine. Neither torch nor pycuda: device buffers, the CUDA stream and the copies come from
runtime/cuda_buffers.py (libcudart through ctypes, which JetPack has), and TensorRT only gets
raw device pointers and the stream handle. TensorRT is imported lazily, inside functions, so
this module imports on machines without it (requesting it there is a ConfigError).

This module also owns what every TensorRT runner shares: `tensorrt_available`, the install hint
and the one process-wide TensorRT logger; runtime/tensorrt_step.py imports them from here.

Written against the TensorRT 10 Python API. TensorRT 11 removed the FP16/INT8 builder flags and
the INT8 calibrator (weak typing; deprecated since 10.12 and 10.1): with it only fp32 builds.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from malmm_ros.errors import CheckpointError, ConfigError, FrameError, MalmmError
from malmm_ros.files import atomic_write
from malmm_ros.runtime.cuda_buffers import (
    CudaError,
    CudaRuntime,
    DeviceArray,
    cuda_runtime,
    release_all,
)
from malmm_ros.runtime.engine_cache import (
    PRECISIONS,
    EngineCache,
    EngineKey,
    ensure_cache_dir,
    onnx_sha256,
)

__all__ = [
    'INSTALL_HINT',
    'TensorRTEncoder',
    'build_engine',
    'current_key',
    'require_tensorrt',
    'tensorrt_available',
    'tensorrt_logger',
]

INSTALL_HINT = (
    'backend tensorrt needs the tensorrt package and a CUDA GPU: pip install .[tensorrt]'
)
MIN_TENSORRT_MAJOR = 10
# The ONNX export's interface (malmm_ros.runtime.onnx_export): one uint8 NHWC input, one output.
INPUT_NAME = 'frames'
OUTPUT_NAME = 'tokens'
IMAGE_SHAPE = (224, 224, 3)
TOKENS_SHAPE = (49, 1280)

_log = logging.getLogger(__name__)


def _major(version: str) -> int:
    match = re.match(r'\d+', version)
    return int(match.group()) if match else 0


def tensorrt_available() -> tuple[bool, str]:
    """(True, what) if TensorRT >= 10 imports and the CUDA runtime sees a GPU, else (False, why
    not: no tensorrt package, too old, no libcudart, no driver or no GPU). No torch: the GPU is
    asked for through libcudart (runtime/cuda_buffers.py)."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libnvinfer is not
        return False, f'the tensorrt package is not importable ({type(exc).__name__}: {exc})'
    version = str(getattr(trt, '__version__', 'unknown'))
    if _major(version) < MIN_TENSORRT_MAJOR:
        return False, f'TensorRT {version} is too old (need >= {MIN_TENSORRT_MAJOR})'
    try:
        cuda = cuda_runtime()
    except ConfigError as exc:  # says libcudart is not found and what to install
        return False, f'TensorRT {version} is installed but the CUDA runtime is not: {exc}'
    try:
        count = cuda.device_count()
        name = cuda.device_name(0) if count > 0 else ''
    except CudaError as exc:  # no driver (cudaErrorInsufficientDriver) or no device
        return False, (f'TensorRT {version} is installed but CUDA has no usable driver or GPU: '
                       f'{exc}')
    if count < 1:
        return False, f'TensorRT {version} is installed but CUDA sees no GPU'
    return True, f'TensorRT {version} on {name}'


def require_tensorrt() -> Any:
    """The tensorrt module, or ConfigError with the install hint and the reason."""
    ok, reason = tensorrt_available()
    if not ok:
        raise ConfigError(f'{INSTALL_HINT} ({reason})')
    import tensorrt as trt

    return trt


@functools.cache
def tensorrt_logger() -> Any:
    """One TensorRT logger for the process, forwarding to `logging` (INFO is chatty: DEBUG).

    TensorRT keeps a single logger pointer: a builder or runtime given another one is warned
    about and gets the first, so every runner takes this one."""
    import tensorrt as trt

    severity = trt.ILogger.Severity
    levels = {severity.INTERNAL_ERROR: logging.CRITICAL, severity.ERROR: logging.ERROR,
              severity.WARNING: logging.WARNING, severity.INFO: logging.DEBUG,
              severity.VERBOSE: logging.DEBUG}

    class _LoggingBridge(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, sev: Any, msg: str) -> None:
            _log.log(levels.get(sev, logging.WARNING), 'TensorRT: %s', msg)

    return _LoggingBridge()


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(
            f'TensorRT precision must be one of {list(PRECISIONS)}, got {precision!r}'
        )


def _check_max_batch(max_batch: int) -> None:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ConfigError(f'max_batch must be a positive int, got {max_batch!r}')


def current_key(
    onnx_path: str | os.PathLike[str],
    precision: str,
    input_shape: tuple[int, ...] = (1, *IMAGE_SHAPE),
) -> EngineKey:
    """The cache key of an engine built here, now: ONNX sha256, TensorRT version, this GPU."""
    trt = require_tensorrt()
    _check_precision(precision)
    cuda = cuda_runtime()
    # Device 0's cudaDeviceProp name, as torch.cuda.get_device_name reported it: old keys hold.
    return EngineKey(
        onnx_sha256=onnx_sha256(onnx_path),
        tensorrt_version=str(trt.__version__),
        gpu_name=cuda.device_name(0),
        compute_capability=cuda.compute_capability(0),
        precision=precision,
        input_shape=tuple(int(d) for d in input_shape),
    )


def _single_frames(frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Each uint8 [224, 224, 3] frame of `frames`, whose items are single frames or batches."""
    for item in frames:
        array = np.asarray(item)
        if array.dtype != np.uint8:
            raise FrameError(f'calibration frames must be uint8 RGB, got dtype {array.dtype}')
        if array.shape == IMAGE_SHAPE:
            yield np.ascontiguousarray(array)
        elif array.ndim == 4 and array.shape[1:] == IMAGE_SHAPE:
            yield from (np.ascontiguousarray(frame) for frame in array)
        else:
            raise FrameError(
                f'calibration frames must be [224, 224, 3] or [B, 224, 224, 3] '
                f'(resize_and_crop output), got shape {array.shape}'
            )


def _make_calibrator(trt: Any, cuda: CudaRuntime, frames: Iterable[np.ndarray],
                     cache_path: Path | None) -> Any:
    """An IInt8EntropyCalibrator2 feeding one frame per batch from a device buffer.

    A batch is what the network input takes, in its own type and layout: uint8 [1, 224, 224, 3]
    (the graph casts to float itself), at the calibration profile's opt shape (batch 1).
    `release()` frees the buffer once the build is over.
    """

    class _EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.frames = _single_frames(frames)
            self.device_batch = DeviceArray(cuda, (1, *IMAGE_SHAPE), np.uint8)
            self.count = 0
            self.used_cache = False
            self.error: BaseException | None = None

        def get_batch_size(self) -> int:
            return 1  # = the calibration profile's opt batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            # Exceptions must not cross into TensorRT's C++ caller: keep it, end calibration.
            try:
                frame = next(self.frames, None)
                if frame is None:
                    return None
                # The legacy default stream (0): calibration is not timed, and synchronizing
                # it means the frame is on the device before TensorRT reads it on its own.
                self.device_batch.upload(frame[None], 0)
                cuda.synchronize(0)
                self.count += 1
                return [self.device_batch.pointer]
            except Exception as exc:
                self.error = exc
                return None

        def read_calibration_cache(self) -> bytes | None:
            if cache_path is None or not cache_path.is_file():
                return None
            try:
                data = cache_path.read_bytes()
            except OSError as exc:  # never raise into TensorRT: calibrate from frames instead
                _log.warning('could not read INT8 calibration cache %s (%s): calibrating again',
                             cache_path, exc)
                return None
            _log.info('INT8 calibration: reusing %s', cache_path)
            self.used_cache = True
            return data

        def write_calibration_cache(self, cache: Any) -> None:
            if cache_path is None:
                return
            try:
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(cache_path, bytes(cache))
            except OSError as exc:
                _log.warning('could not write INT8 calibration cache %s: %s', cache_path, exc)

        def release(self) -> None:
            try:
                self.device_batch.release()
            except CudaError as exc:  # the build's outcome matters more than a failed free
                _log.warning('could not free the INT8 calibration buffer: %s', exc)

    return _EntropyCalibrator()


def build_engine(
    onnx_path: str | os.PathLike[str],
    *,
    precision: str = 'fp16',
    calibration_frames: Iterable[np.ndarray] | None = None,
    calibration_cache: str | os.PathLike[str] | None = None,
    workspace_bytes: int = 1 << 30,
    max_batch: int = 1,
) -> bytes:
    """Build a serialized TensorRT engine from the encoder's ONNX file (slow: seconds to minutes).

    The 'frames' input gets one optimization profile, batch 1/1/max_batch (min/opt/max). fp16
    and int8 let TensorRT pick fp32 kernels where faster or needed; int8 also enables fp16 for the
    layers it does not quantize, and needs `calibration_frames` (uint8 [224, 224, 3] frames or
    [B, 224, 224, 3] batches, resize_and_crop output) unless `calibration_cache` already exists.
    """
    trt = require_tensorrt()
    _check_precision(precision)
    _check_max_batch(max_batch)
    path = Path(onnx_path)
    if not path.is_file():
        raise CheckpointError(f'ONNX file {path} does not exist')
    cache_path = Path(calibration_cache) if calibration_cache is not None else None
    if precision == 'int8' and calibration_frames is None and not (
        cache_path is not None and cache_path.is_file()
    ):
        raise ConfigError(
            'TensorRT precision int8 needs calibration_frames (representative uint8 '
            '[224, 224, 3] RGB frames) or an existing calibration cache'
        )
    if precision != 'fp32' and not hasattr(trt.BuilderFlag, 'FP16'):
        raise ConfigError(
            f'TensorRT {trt.__version__} has no FP16/INT8 builder flags (removed in TensorRT 11); '
            'use precision fp32'
        )

    logger = tensorrt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: always explicit batch, no flag needed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(path.read_bytes(), str(path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise CheckpointError(
            f'TensorRT could not parse {path}: ' + ('; '.join(errors) or 'no error reported')
        )
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs != [INPUT_NAME]:
        raise CheckpointError(f'ONNX file {path} must have one input {INPUT_NAME!r}, has {inputs}')

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, *IMAGE_SHAPE), (1, *IMAGE_SHAPE), (max_batch, *IMAGE_SHAPE))
    if config.add_optimization_profile(profile) < 0:
        raise CheckpointError(f'TensorRT rejected the optimization profile for {path}')
    calibrator = None
    if precision in ('fp16', 'int8'):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == 'int8':
        config.set_flag(trt.BuilderFlag.INT8)
        frames = calibration_frames if calibration_frames is not None else ()
        calibrator = _make_calibrator(trt, cuda_runtime(), frames, cache_path)
        config.int8_calibrator = calibrator  # deprecated since TensorRT 10.1, still works in 10.x
        config.set_calibration_profile(profile)

    _log.info('building TensorRT %s engine from %s (max batch %d)', precision, path, max_batch)
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.release()
    if calibrator is not None:
        if calibrator.error is not None:
            raise CheckpointError(
                f'INT8 calibration failed: {type(calibrator.error).__name__}: {calibrator.error}'
            ) from calibrator.error
        if calibrator.count == 0 and not calibrator.used_cache:
            raise ConfigError('INT8 calibration got no frames (calibration_frames was empty)')
    if serialized is None:
        raise CheckpointError(
            f'TensorRT failed to build a {precision} engine from {path}; see the TensorRT '
            'messages logged above'
        )
    return bytes(serialized)


def _check_engine_io(trt: Any, engine: Any) -> None:
    """CheckpointError unless the engine has exactly uint8 'frames' [B, 224, 224, 3] in and
    float32 'tokens' [B, 49, 1280] out: the device buffers are sized for those."""
    names = sorted(engine.get_tensor_name(i) for i in range(engine.num_io_tensors))
    if names != sorted((INPUT_NAME, OUTPUT_NAME)):
        raise CheckpointError(
            f'engine I/O tensors are {names}, expected {INPUT_NAME!r} and {OUTPUT_NAME!r}'
        )
    expected = {
        INPUT_NAME: (trt.TensorIOMode.INPUT, trt.DataType.UINT8, IMAGE_SHAPE),
        OUTPUT_NAME: (trt.TensorIOMode.OUTPUT, trt.DataType.FLOAT, TOKENS_SHAPE),
    }
    for name, want in expected.items():
        got = (engine.get_tensor_mode(name), engine.get_tensor_dtype(name),
               tuple(engine.get_tensor_shape(name))[1:])  # the batch dimension is -1
        if got != want:
            raise CheckpointError(f'engine tensor {name!r} is {got}, expected {want}')


class TensorRTEncoder:
    """uint8 RGB frames [B, 224, 224, 3] -> float32 tokens [B, 49, 1280] with a TensorRT engine.

    The engine comes from `cache_dir` when one matches this ONNX file, TensorRT version, GPU,
    precision and max batch; otherwise it is built (minutes on a Jetson) and cached there. A
    `cache_dir` that cannot be created or read is a ConfigError before any build. Device buffers
    for max_batch frames are allocated once; `close()` (or garbage collection) frees them.
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike[str],
        *,
        cache_dir: str | os.PathLike[str],
        precision: str = 'fp16',
        calibration_frames: Iterable[np.ndarray] | None = None,
        calibration_cache: str | os.PathLike[str] | None = None,
        max_batch: int = 1,
        workspace_bytes: int = 1 << 30,
    ) -> None:
        trt = require_tensorrt()
        _check_precision(precision)
        _check_max_batch(max_batch)
        cache_dir = ensure_cache_dir(cache_dir)
        onnx_path = Path(onnx_path)
        self.key = current_key(onnx_path, precision, (max_batch, *IMAGE_SHAPE))
        cache = EngineCache(cache_dir)
        stale = cache.stale(self.key)
        if stale:
            _log.warning('found %d stale engine(s) for this ONNX file in %s (other TensorRT '
                         'version, GPU or precision; not deleted): %s', len(stale),
                         cache.directory, ', '.join(p.name for p in stale))
        if precision == 'int8' and calibration_cache is None:
            calibration_cache = cache.directory / (
                self.key.filename().removesuffix('.engine') + '.calib'
            )

        runtime = trt.Runtime(tensorrt_logger())

        def build() -> bytes:
            return build_engine(
                onnx_path, precision=precision, calibration_frames=calibration_frames,
                calibration_cache=calibration_cache, workspace_bytes=workspace_bytes,
                max_batch=max_batch,
            )

        def deserialize(data: bytes) -> Any:
            engine = runtime.deserialize_cuda_engine(data)
            if engine is not None:
                _check_engine_io(trt, engine)
            return engine

        info = {
            'onnx_path': str(onnx_path),
            'precision': precision,
            'max_batch': max_batch,
            'workspace_bytes': workspace_bytes,
            'calibration_cache': str(calibration_cache) if calibration_cache else None,
        }
        self._runtime = runtime  # outlives the engine it deserialized
        self.engine = cache.load_or_build(self.key, build, deserialize, info=info)
        self.engine_path = cache.paths(self.key)[0]
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise CheckpointError(
                f'could not create a TensorRT execution context for {self.engine_path} '
                '(out of GPU memory?)'
            )
        self.max_batch = max_batch
        cuda = cuda_runtime()
        self._cuda = cuda
        # Our own stream: TensorRT warns about (and synchronizes more on) the default stream.
        self._stream = cuda.create_stream()
        allocated: list[DeviceArray] = []  # freed with the encoder, even if __init__ fails below
        self._finalizer = weakref.finalize(self, release_all, cuda, allocated, self._stream,
                                          'TensorRT encoder')
        self._input = DeviceArray(cuda, (max_batch, *IMAGE_SHAPE), np.uint8)
        allocated.append(self._input)
        self._output = DeviceArray(cuda, (max_batch, *TOKENS_SHAPE), np.float32)
        allocated.append(self._output)
        # DeviceArray copies whole buffers: a smaller batch is staged in the first rows here.
        self._host_input = np.zeros((max_batch, *IMAGE_SHAPE), np.uint8)
        self.context.set_tensor_address(INPUT_NAME, self._input.pointer)
        self.context.set_tensor_address(OUTPUT_NAME, self._output.pointer)
        self._lock = threading.Lock()  # one context, one set of buffers
        self.name = f'tensorrt-{precision}'
        _log.info('TensorRT encoder ready: %s (%s)', self.name, self.engine_path.name)

    def run(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [B, 224, 224, 3] RGB (1 <= B <= max_batch) -> float32 tokens [B, 49, 1280]."""
        if (
            not isinstance(frames, np.ndarray)
            or frames.dtype != np.uint8
            or frames.ndim != 4
            or frames.shape[1:] != IMAGE_SHAPE
        ):
            got = (f'shape {frames.shape}, dtype {frames.dtype}'
                   if isinstance(frames, np.ndarray) else f'type {type(frames).__name__}')
            raise FrameError(f'expected uint8 frames [B, 224, 224, 3], got {got}')
        batch = frames.shape[0]
        if not 1 <= batch <= self.max_batch:
            raise FrameError(
                f'batch of {batch} frames: this engine takes 1 to {self.max_batch} (max_batch)'
            )
        if not self._finalizer.alive:
            raise MalmmError(f'TensorRT encoder {self.engine_path.name} is closed')
        with self._lock:
            self._host_input[:batch] = frames  # rows past `batch` are left over, never read
            self._input.upload(self._host_input, self._stream)
            if not self.context.set_input_shape(INPUT_NAME, (batch, *IMAGE_SHAPE)):
                raise FrameError(f'TensorRT rejected input shape {(batch, *IMAGE_SHAPE)}')
            if not self.context.execute_async_v3(self._stream):
                raise MalmmError('TensorRT execution failed; see the TensorRT messages logged')
            tokens = self._output.download(self._stream)  # a new array each call
            self._cuda.synchronize(self._stream)
        return tokens[:batch]

    def close(self) -> None:
        """Free the device buffers and the stream now (idempotent)."""
        self._finalizer()
