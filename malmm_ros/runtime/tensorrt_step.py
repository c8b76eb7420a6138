"""The step graphs (projection, step) as TensorRT engines, run like ONNX Runtime sessions.

`TensorRTGraph` builds one ONNX graph into a TensorRT 10 engine whose every input is fixed at
the shape it is given: the optimization profile's min = opt = max, since the node's memory
length M, hence the banks' row counts, is fixed for a run. Engines live in the encoder's
`EngineCache` under the same key rules (ONNX sha256, TensorRT version, GPU name and compute
capability, precision) plus every input's shape, so another M builds another engine. The graph
answers `get_inputs()` and `run(None, feeds)` as an ONNX Runtime session does, which is all
`OnnxStep` uses. Device buffers come from runtime/cuda_buffers.py, so neither torch nor pycuda
is needed (a Jetson has libcudart with JetPack). TensorRT is imported inside functions: this
module imports anywhere. Availability, the install hint and the one TensorRT logger of the
process (TensorRT keeps a single one) come from runtime/tensorrt_encoder.py.

Index inputs (the banks' age buckets) are INT64 in the ONNX graphs; since TensorRT 9 the ONNX
parser keeps INT64 and the engine's bindings are INT64 (onnx-tensorrt's changelog), so feeds
are passed in the engine's own dtype, whichever it reports.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from malmm_ros.errors import CheckpointError, ConfigError, MalmmError
from malmm_ros.runtime.cuda_buffers import (
    CudaRuntime,
    DeviceArray,
    cuda_runtime,
    release_all,
)
from malmm_ros.runtime.engine_cache import EngineCache, EngineKey, ensure_cache_dir, onnx_sha256
from malmm_ros.runtime.step_spec import StepSpec
from malmm_ros.runtime.tensorrt_encoder import (
    INSTALL_HINT,
    require_tensorrt,
    tensorrt_available,
    tensorrt_logger,
)

__all__ = ['GRAPH_PRECISIONS', 'INSTALL_HINT', 'GraphInput', 'TensorRTGraph',
           'build_graph_engine', 'graph_key', 'require_tensorrt', 'step_graph_shapes',
           'tensorrt_available']

GRAPH_PRECISIONS = ('fp32', 'fp16')
Shapes = Mapping[str, Sequence[int]]

_log = logging.getLogger(__name__)


def _check_precision(precision: str) -> None:
    if precision == 'int8':
        raise ConfigError(
            'TensorRT int8 is for the encoder (calibrated on the bundle\'s frames); the step '
            'graphs build in fp16 or fp32: their inputs are memory banks, masks and indices '
            'with no calibration set, and TensorRT deprecated implicit INT8 calibration in 10.1'
        )
    if precision not in GRAPH_PRECISIONS:
        raise ConfigError(f'TensorRT precision of a step graph must be one of '
                          f'{list(GRAPH_PRECISIONS)}, got {precision!r}')


def step_graph_shapes(spec: StepSpec, capacity: int) -> tuple[dict[str, tuple[int, ...]],
                                                                 dict[str, tuple[int, ...]]]:
    """(projection inputs, step inputs) -> shape for a bank of `capacity` (M) slots: each bank
    holds M + 1 slots of rows, the newest frame's included (runtime/step_export.py)."""
    visual_rows = (capacity + 1) * spec.num_tokens
    query_rows = (capacity + 1) * spec.num_queries
    projection = {'tokens': (1, spec.num_tokens, spec.feature_dim),
                  'decay_fresh': (len(spec.decay_rates),)}
    step: dict[str, tuple[int, ...]] = {'decay_scale': (spec.value_width,)}
    for prefix, rows in [('visual', visual_rows)] + [
            (f'query{layer}', query_rows) for layer in range(spec.num_layers)]:
        for part in ('buckets', 'places', 'mask'):
            step[f'{prefix}_{part}'] = (rows,)
    # Bank fields hold keys in their first half of heads, values in the second: one half each.
    for name, (heads, width) in spec.visual_fields().items():
        step[f'{name}_k'] = step[f'{name}_v'] = (heads // 2, visual_rows, width)
    heads, width = spec.query_fields()['kv']
    for layer in range(spec.num_layers):
        step[f'query{layer}_k'] = step[f'query{layer}_v'] = (heads // 2, query_rows, width)
    return ({name: projection[name] for name in spec.projection_inputs()},
            {name: step[name] for name in spec.step_inputs()})


def _ordered(shapes: Shapes) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((name, tuple(int(d) for d in shape)) for name, shape in shapes.items())


def graph_key(onnx_path: str | os.PathLike[str], precision: str, shapes: Shapes,
              cuda: CudaRuntime | None = None) -> EngineKey:
    """The cache key of an engine of `onnx_path` built here, now, for these input shapes."""
    _check_precision(precision)
    trt = require_tensorrt()
    cuda = cuda or cuda_runtime()
    named = _ordered(shapes)
    if not named:
        raise ConfigError('a TensorRT graph needs the shape of each of its inputs')
    return EngineKey(onnx_sha256=onnx_sha256(onnx_path), tensorrt_version=str(trt.__version__),
                     gpu_name=cuda.device_name(0), compute_capability=cuda.compute_capability(0),
                     precision=precision, input_shape=named[0][1], input_shapes=named)


def build_graph_engine(onnx_path: str | os.PathLike[str], *, precision: str, shapes: Shapes,
                       outputs: Sequence[str] | None = None,
                       workspace_bytes: int = 1 << 30) -> bytes:
    """A serialized engine of `onnx_path` taking exactly `shapes` (graph inputs in order ->
    shape). CheckpointError when the graph's inputs or outputs are not those named."""
    _check_precision(precision)
    trt = require_tensorrt()
    path = Path(onnx_path)
    if not path.is_file():
        raise CheckpointError(f'ONNX file {path} does not exist')
    if precision == 'fp16' and not hasattr(trt.BuilderFlag, 'FP16'):
        raise ConfigError(f'TensorRT {trt.__version__} has no FP16 builder flag (removed in '
                          'TensorRT 11); use precision fp32')
    logger = tensorrt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: always explicit batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(path.read_bytes(), str(path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise CheckpointError(f'TensorRT could not parse {path}: '
                              + ('; '.join(errors) or 'no error reported'))
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    found = [tensor.name for tensor in inputs]
    if found != list(shapes):
        raise CheckpointError(f'{path} has inputs {found}, expected {list(shapes)}')
    found = [network.get_output(i).name for i in range(network.num_outputs)]
    if outputs is not None and found != list(outputs):
        raise CheckpointError(f'{path} has outputs {found}, expected {list(outputs)}')

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile = builder.create_optimization_profile()
    dynamic = False
    for tensor in inputs:
        have, want = tuple(tensor.shape), tuple(int(d) for d in shapes[tensor.name])
        if len(have) != len(want) or any(
                h not in (-1, w) for h, w in zip(have, want, strict=True)):
            raise CheckpointError(f'{path}: input {tensor.name} has shape {have} (-1: any), '
                                  f'which cannot be {want}')
        if -1 in have:  # fixed for this engine: one shape is min, opt and max
            profile.set_shape(tensor.name, want, want, want)
            dynamic = True
    if dynamic and config.add_optimization_profile(profile) < 0:
        raise CheckpointError(f'TensorRT rejected the optimization profile for {path}')
    if precision == 'fp16':
        config.set_flag(trt.BuilderFlag.FP16)
    elif hasattr(trt.BuilderFlag, 'TF32'):
        # TF32 is on by default: fp32 matmuls would round inputs to 10-bit mantissas.
        config.clear_flag(trt.BuilderFlag.TF32)
    _log.info('building TensorRT %s engine from %s', precision, path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckpointError(f'TensorRT failed to build a {precision} engine from {path}; '
                              'see the TensorRT messages logged above')
    return bytes(serialized)


class GraphInput(NamedTuple):
    """An input as `get_inputs()` lists it (ONNX Runtime's NodeArg has .name and .shape too)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


class TensorRTGraph:
    """One ONNX graph as a TensorRT engine with fixed input shapes, run like an ONNX Runtime
    session: `get_inputs()` and `run(None, feeds) -> [outputs]`.

    `shapes` names the graph's inputs in its order, each with the one shape it will take.
    `outputs`, when given, is the graph's output order (checked); otherwise the engine's.
    Buffers on the device are allocated once; `close()` (or garbage collection) frees them.
    """

    def __init__(self, onnx_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str],
                 precision: str = 'fp16', shapes: Shapes,
                 outputs: Sequence[str] | None = None, workspace_bytes: int = 1 << 30) -> None:
        _check_precision(precision)
        trt = require_tensorrt()
        cuda = cuda_runtime()
        onnx_path = Path(onnx_path)
        self.key = graph_key(onnx_path, precision, shapes, cuda)
        cache = EngineCache(ensure_cache_dir(cache_dir), stem=onnx_path.stem)
        stale = cache.stale(self.key)
        if stale:
            _log.warning('found %d stale engine(s) of %s in %s (other TensorRT version, GPU or '
                         'precision; not deleted): %s', len(stale), onnx_path.name,
                         cache.directory, ', '.join(p.name for p in stale))
        shapes = dict(self.key.input_shapes)
        runtime = trt.Runtime(tensorrt_logger())

        def build() -> bytes:
            return build_graph_engine(onnx_path, precision=precision, shapes=shapes,
                                      outputs=outputs, workspace_bytes=workspace_bytes)

        def deserialize(data: bytes) -> Any:
            engine = runtime.deserialize_cuda_engine(data)
            if engine is not None:
                _check_io(trt, engine, shapes, outputs)
            return engine

        info = {'onnx_path': str(onnx_path), 'precision': precision,
                'workspace_bytes': workspace_bytes}
        self._runtime = runtime  # outlives the engine it deserialized
        self.engine = cache.load_or_build(self.key, build, deserialize, info=info)
        self.engine_path = cache.paths(self.key)[0]
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise CheckpointError(f'could not create a TensorRT execution context for '
                                  f'{self.engine_path} (out of GPU memory?)')
        engine = self.engine
        for name, shape in shapes.items():
            if -1 in tuple(engine.get_tensor_shape(name)) and \
                    not self.context.set_input_shape(name, shape):
                raise CheckpointError(f'{self.engine_path}: TensorRT refused input {name} of '
                                      f'shape {shape}')
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._outputs = list(outputs) if outputs is not None else [
            n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._cuda = cuda
        self._stream = cuda.create_stream()  # TensorRT syncs more on the default stream
        self._buffers: dict[str, DeviceArray] = {}
        allocated: list[DeviceArray] = []  # freed with the graph, even if __init__ fails below
        self._finalizer = weakref.finalize(self, release_all, cuda, allocated, self._stream,
                                          'TensorRT graph')
        for name in [*shapes, *self._outputs]:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise CheckpointError(f'{self.engine_path}: tensor {name} has no fixed shape '
                                      f'({shape}) for these inputs')
            buffer = DeviceArray(cuda, shape, _numpy_dtype(trt, engine, name))
            allocated.append(buffer)
            self._buffers[name] = buffer
            self.context.set_tensor_address(name, buffer.pointer)
        self._inputs = [GraphInput(n, s, self._buffers[n].dtype) for n, s in shapes.items()]
        self._lock = threading.Lock()  # one context, one set of buffers
        _log.info('TensorRT graph ready: %s (%s)', onnx_path.name, self.engine_path.name)

    def get_inputs(self) -> list[GraphInput]:
        return list(self._inputs)

    def run(self, output_names: Sequence[str] | None,
            feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs named (all, in order, for None) for `feeds` (every input by name).
        Feeds are cast to the engine's dtype; a shape other than the built one is ValueError."""
        if not self._finalizer.alive:
            raise MalmmError(f'TensorRT graph {self.engine_path.name} is closed')
        wanted = list(self._outputs if output_names is None else output_names)
        names = [i.name for i in self._inputs]
        if set(feeds) != set(names) or not set(wanted) <= set(self._outputs):
            raise ValueError(f'feeds {sorted(feeds)} and outputs {wanted} do not match the '
                             f'graph\'s inputs {names} and outputs {self._outputs}')
        staged = []
        for name in names:  # cast and check everything before anything is queued
            buffer = self._buffers[name]
            array = np.ascontiguousarray(feeds[name], dtype=buffer.dtype)
            if array.shape != buffer.shape:
                raise ValueError(f'input {name}: shape {array.shape}, the engine was built for '
                                 f'{buffer.shape}')
            staged.append((buffer, array))
        with self._lock:
            for buffer, array in staged:
                buffer.upload(array, self._stream)
            if not self.context.execute_async_v3(self._stream):
                raise MalmmError(f'TensorRT execution of {self.engine_path.name} failed; see '
                                 'the TensorRT messages logged')
            results = [self._buffers[name].download(self._stream) for name in wanted]
            self._cuda.synchronize(self._stream)
        return results

    def close(self) -> None:
        """Free the device buffers and the stream now (idempotent)."""
        self._finalizer()


def _numpy_dtype(trt: Any, engine: Any, name: str) -> np.dtype:
    dtype = engine.get_tensor_dtype(name)
    try:
        return np.dtype(trt.nptype(dtype))
    except (TypeError, KeyError):
        raise CheckpointError(f'engine tensor {name} has type {dtype}, which numpy cannot '
                              'hold') from None


def _check_io(trt: Any, engine: Any, shapes: Mapping[str, Any],
              outputs: Sequence[str] | None) -> None:
    """CheckpointError unless the engine's inputs (and outputs, when named) are those."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    found = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if sorted(inputs) != sorted(shapes) or (outputs is not None
                                            and sorted(found) != sorted(outputs)):
        raise CheckpointError(f'engine has inputs {inputs} and outputs {found}, expected '
                              f'{list(shapes)} and {list(outputs or found)}')
