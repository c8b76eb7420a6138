"""runtime: onnx — a bundle's step graphs on ONNX Runtime, the memory in numpy; no torch."""

from __future__ import annotations

import numpy as np

from malmm_ros.config import AnticipateConfig
from malmm_ros.errors import OutputError
from malmm_ros.runtime.bundle import Bundle
from malmm_ros.runtime.onnx_step import OnnxStep

__all__ = ['OnnxRunner']


class OnnxRunner:
    """Memory + Q-Former + heads of one stream from `bundle` (runtime/onnx_step.py)."""

    def __init__(self, config: AnticipateConfig, bundle: Bundle) -> None:
        providers = (['CUDAExecutionProvider', 'CPUExecutionProvider'] if config.device == 'cuda'
                     else ['CPUExecutionProvider'])
        self.step_graphs = OnnxStep(bundle.file('projection.onnx'), bundle.file('step.onnx'),
                                    bundle.spec, config.memory_bank_length,
                                    threads=config.threads(), providers=providers)
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
        out = self.step_graphs.probabilities()
        for name, probs in zip(('verb', 'noun', 'action'), out, strict=True):
            if probs is not None and not np.isfinite(probs).all():
                raise OutputError(f'the {name} head gave non-finite scores (broken weights or '
                                  'input); prediction withheld')
        return out
