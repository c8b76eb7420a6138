"""runtime: onnx — a bundle's step graphs on ONNX Runtime (or TensorRT with backend tensorrt),
the memory in numpy; no torch."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from malmm_ros.config import AnticipateConfig
from malmm_ros.runtime.bundle import Bundle
from malmm_ros.runtime.onnx_step import OnnxStep

__all__ = ['OnnxRunner']

_log = logging.getLogger(__name__)


def tensorrt_graphs(config: AnticipateConfig, bundle: Bundle) -> Callable[[Path, list[str]], Any]:
    """OnnxStep's `open_graph` for backend tensorrt: each of the bundle's step graphs as an
    engine fixed at the config's memory length (runtime/tensorrt_step.py). ConfigError with the
    install hint, before anything is built, where TensorRT cannot run."""
    from malmm_ros.runtime.onnx_files import default_engine_dir
    from malmm_ros.runtime.tensorrt_step import (
        TensorRTGraph,
        require_tensorrt,
        step_graph_shapes,
    )

    require_tensorrt()
    precision = config.encoder_precision()
    if precision == 'int8':
        _log.info('precision int8 is for the TensorRT encoder: the step graphs build in fp16')
        precision = 'fp16'
    spec = bundle.spec
    projection, step = step_graph_shapes(spec, config.memory_bank_length)
    graphs = {bundle.file('projection.onnx'): (projection, spec.projection_outputs()),
              bundle.file('step.onnx'): (step, spec.step_outputs())}
    cache_dir = config.engine_dir or default_engine_dir()

    def open_graph(path: Path, inputs: list[str]) -> TensorRTGraph:
        shapes, outputs = graphs[path]
        return TensorRTGraph(path, cache_dir=cache_dir, precision=precision, shapes=shapes,
                             outputs=outputs)

    return open_graph


class OnnxRunner:
    """Memory + Q-Former + heads of one stream from `bundle` (runtime/onnx_step.py)."""

    def __init__(self, config: AnticipateConfig, bundle: Bundle) -> None:
        providers = (['CUDAExecutionProvider', 'CPUExecutionProvider'] if config.device == 'cuda'
                     else ['CPUExecutionProvider'])
        open_graph = tensorrt_graphs(config, bundle) if config.backend == 'tensorrt' else None
        self.step_graphs = OnnxStep(bundle.file('projection.onnx'), bundle.file('step.onnx'),
                                    bundle.spec, config.memory_bank_length,
                                    threads=config.threads(), providers=providers,
                                    open_graph=open_graph)
        self.labels = bundle.labels
        self.trained = bundle.trained
        self.memory = self.step_graphs.memory

    @property
    def queries(self) -> np.ndarray | None:
        return self.step_graphs.queries

    def set_threads(self, threads: int) -> None:
        """ONNX Runtime fixes its threads when a session opens: they stay until a rebuild."""

    def reset(self) -> None:
        self.step_graphs.reset()

    def step(self, tokens: np.ndarray, now_s: float) -> None:
        self.step_graphs.step(tokens, now_s)

    def probabilities(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        return self.step_graphs.probabilities()
