"""The MA-LMM step on ONNX Runtime with the memory in numpy: no torch.

One `OnnxStep` runs one stream: each `step(tokens, now_s)` opens the banks' newest slot, feeds
the graph every stored row (runtime/step_export.py), writes the rows it returns and compresses
(runtime/numpy_memory.py). The probabilities of the newest step stay for `probabilities()`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from malmm_ros.errors import CheckpointError
from malmm_ros.runtime.numpy_memory import NumpyMemory
from malmm_ros.runtime.ort_session import checked_providers, session_options
from malmm_ros.runtime.step_spec import StepSpec

__all__ = ['OnnxStep', 'open_session']


def open_session(path: str | os.PathLike, *, threads: int = 0,
                 providers: list[str] | None = None) -> Any:
    """An ONNX Runtime session for `path` (CheckpointError naming it if it cannot load).

    Threads do not spin when idle: the encoder and this graph take turns on the same cores.
    """
    import onnxruntime as ort

    options = session_options(threads)
    providers = checked_providers(providers)
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own types for unreadable graphs
        message = ' '.join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f'cannot load ONNX graph {path}: {message}') from None


class OnnxStep:
    """Memory + Q-Former + heads of one stream, from the projection and step graphs and their
    StepSpec (runtime/step_export.py).

    `open_graph(path, input names)` opens each graph as a session-like object (`get_inputs()`,
    `run(None, feeds)`); the default is ONNX Runtime with `threads` and `providers`, another is
    a TensorRT engine (runtime/tensorrt_step.py).
    """

    def __init__(self, projection: str | os.PathLike, step: str | os.PathLike, spec: StepSpec,
                 capacity: int, *, threads: int = 0, providers: list[str] | None = None,
                 open_graph: Callable[[Path, list[str]], Any] | None = None) -> None:
        def onnx_runtime(path: Path, inputs: list[str]) -> Any:
            return open_session(path, threads=threads, providers=providers)

        self.spec = spec
        self.sessions = []
        for path, inputs in ((projection, spec.projection_inputs()),
                             (step, spec.step_inputs())):
            session = (open_graph or onnx_runtime)(Path(path), inputs)
            found = [i.name for i in session.get_inputs()]
            if found != inputs:
                raise CheckpointError(f'graph {path} has inputs {found}, its spec says '
                                      f'{inputs}: the bundle is inconsistent; export it again')
            self.sessions.append(session)
        self.memory = NumpyMemory(
            capacity, num_layers=spec.num_layers, num_tokens=spec.num_tokens,
            num_queries=spec.num_queries, visual_fields=spec.visual_fields(),
            query_fields=spec.query_fields(), decay_rates=spec.decay_rates,
            visual_decay_fields=spec.decay_fields())
        # The step graph scales each head's returned values by this: ones, then the decays'.
        self._decay_scale = np.ones(spec.value_width, np.float32)
        self.queries: np.ndarray | None = None  # [1, Q, D] of the newest step
        self._probabilities: tuple[np.ndarray, ...] = ()

    def reset(self) -> None:
        self.memory.reset()
        self.queries = None
        self._probabilities = ()

    def step(self, tokens: np.ndarray, now_s: float) -> np.ndarray:
        """Encoder tokens [1, N, F] float32 of the frame at now_s -> query outputs [1, Q, D]."""
        spec = self.spec
        if tokens.shape != (1, spec.num_tokens, spec.feature_dim):
            raise ValueError(f'tokens {tokens.shape} do not fit the step graphs '
                             f'(1, {spec.num_tokens}, {spec.feature_dim})')
        projection, step = self.sessions
        visual, queries = self.memory.visual, self.memory.query_bank
        visual.open_slot(now_s)
        queries.open_slot(now_s)
        feeds = {'tokens': np.ascontiguousarray(tokens, np.float32)}
        if spec.decay_rates:
            feeds['decay_fresh'] = visual.fresh
        for name, rows in zip(spec.projection_outputs(), projection.run(None, feeds),
                              strict=True):
            if name == 'visual':
                visual.write('tokens', rows[None, None])  # (N, C) -> (G, H, N, C)
            else:
                visual.write(name, rows[None])  # (2h, N, w): keys, then values
        buckets, places, mask = visual.attention_inputs(now_s, spec.time_buckets,
                                                        spec.max_age_s, mask_newest=False)
        feeds = {'visual_buckets': buckets[0], 'visual_mask': mask[0]}
        if spec.order_bias:
            feeds['visual_places'] = places[0]
        if spec.decay_rates:
            self._decay_scale[-len(spec.decay_rates):] = visual.scale
            feeds['decay_scale'] = self._decay_scale
        heads = spec.num_heads
        for layer in spec.cross_layers:  # the keys' and the values' heads: contiguous views
            rows = visual.rows(f'cross{layer}')
            feeds[f'cross{layer}_k'], feeds[f'cross{layer}_v'] = rows[:heads], rows[heads:]
        buckets, places, mask = queries.attention_inputs(now_s, spec.time_buckets,
                                                         spec.max_age_s, mask_newest=True)
        for layer in range(spec.num_layers):
            prefix = f'query{layer}'
            feeds[f'{prefix}_buckets'], feeds[f'{prefix}_mask'] = buckets[layer], mask[layer]
            if spec.order_bias:
                feeds[f'{prefix}_places'] = places[layer]
            rows = queries.rows('kv', layer)
            feeds[f'{prefix}_k'], feeds[f'{prefix}_v'] = rows[:heads], rows[heads:]
        results = step.run(None, feeds)
        layers = spec.num_layers
        queries.write('tokens', np.stack(results[0:2 * layers:2])[:, None])  # (L, 1, Q, D)
        queries.write('kv', np.stack(results[1:2 * layers:2]))  # (L, 2h, Q, w)
        queries.commit()
        visual.commit()
        self.queries = results[2 * layers][None]
        self._probabilities = tuple(results[2 * layers + 1:])
        return self.queries

    def probabilities(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(verb, noun, action or None) probabilities after the newest step."""
        if not self._probabilities:
            raise RuntimeError('no step yet')
        verb, noun, *action = self._probabilities
        return verb, noun, action[0] if action else None
