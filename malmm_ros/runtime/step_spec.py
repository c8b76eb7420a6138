"""What the exported step graph expects: its inputs, outputs and the memory shaped for it.

Torch-free: the runtime (runtime/onnx_step.py) reads a `StepSpec` from a bundle's manifest,
the exporter (runtime/step_export.py) writes it from a model. Names of the graph's inputs and
outputs are made here only, so both sides agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from malmm_ros.errors import CheckpointError

__all__ = ['StepSpec']


@dataclass(frozen=True)
class StepSpec:
    """The step graphs' shapes and time settings (one stream, batch 1).

    Two graphs: the projection (encoder tokens -> the visual bank's tokens and each
    cross-attention layer's keys and values of the frame, written into the bank before the
    step) and the step (every bank's rows -> each layer's query rows of this frame, the query
    outputs and the heads' probabilities). Cached keys and values are head-major,
    [heads, rows, width per head], as the attention reads them.
    """

    num_layers: int
    num_heads: int
    num_tokens: int  # encoder tokens per frame (49)
    feature_dim: int  # encoder token width (1280)
    encoder_width: int  # visual bank token width
    hidden_size: int
    num_queries: int
    cross_layers: tuple[int, ...]  # layers that cross-attend to the visual bank
    key_width: int  # cached key width per head of a cross-attention layer
    value_width: int  # cached value width per head (decays included): equal to key_width
    decay_rates: tuple[float, ...]  # 1 / tau per timescale; () without decays
    time_buckets: int
    max_age_s: float
    order_bias: bool  # the attention reads each row's place in the order
    has_action_head: bool

    # -- names ------------------------------------------------------------------------------

    def visual_fields(self) -> dict[str, tuple[int, int]]:
        """Visual bank fields: name -> (heads, width per head). Each cross-attention layer's
        keys and values are one field, keys in its first heads and values in the rest: one
        merge for both, and each half is still one contiguous graph input."""
        out = {'tokens': (1, self.encoder_width)}
        for layer in self.cross_layers:
            out[f'cross{layer}'] = (2 * self.num_heads, self.key_width)
        return out

    def decay_fields(self) -> dict[str, int]:
        """Visual bank fields holding decays -> their first head that does (the values')."""
        return ({f'cross{layer}': self.num_heads for layer in self.cross_layers}
                if self.decay_rates else {})

    def query_fields(self) -> dict[str, tuple[int, int]]:
        """Query bank fields (one bank per layer): the layer's input queries, and its
        self-attention's cached keys then values."""
        return {'tokens': (1, self.hidden_size),
                'kv': (2 * self.num_heads, self.hidden_size // self.num_heads)}

    def projection_inputs(self) -> list[str]:
        return ['tokens'] + (['decay_fresh'] if self.decay_rates else [])

    def projection_outputs(self) -> list[str]:
        return ['visual'] + [f'cross{layer}' for layer in self.cross_layers]

    def step_inputs(self) -> list[str]:
        bias = ('buckets', 'places', 'mask') if self.order_bias else ('buckets', 'mask')
        names = [f'visual_{part}' for part in bias]
        names += ['decay_scale'] if self.decay_rates else []
        for layer in self.cross_layers:
            names += [f'cross{layer}_k', f'cross{layer}_v']
        for layer in range(self.num_layers):
            names += [f'query{layer}_{part}' for part in (*bias, 'k', 'v')]
        return names

    def step_outputs(self) -> list[str]:
        names = []
        for layer in range(self.num_layers):
            names += [f'query{layer}_tokens_new', f'query{layer}_kv_new']
        names += ['queries', 'verb', 'noun']
        return names + (['action'] if self.has_action_head else [])

    # -- manifest ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out['cross_layers'] = list(self.cross_layers)
        out['decay_rates'] = list(self.decay_rates)
        return out

    @classmethod
    def from_json(cls, data: Any, source: str = 'manifest') -> StepSpec:
        if not isinstance(data, dict):
            raise CheckpointError(f'{source}: step spec is not an object')
        names = {f.name for f in fields(cls)}
        missing, unknown = names - set(data), set(data) - names
        if missing or unknown:
            raise CheckpointError(f'{source}: step spec missing {sorted(missing)}, unknown '
                                  f'{sorted(unknown)}')
        try:
            values = dict(data)
            values['cross_layers'] = tuple(int(v) for v in data['cross_layers'])
            values['decay_rates'] = tuple(float(v) for v in data['decay_rates'])
            for name in ('num_layers', 'num_heads', 'num_tokens', 'feature_dim',
                         'encoder_width', 'hidden_size', 'num_queries', 'key_width',
                         'value_width', 'time_buckets'):
                if isinstance(data[name], bool) or not isinstance(data[name], int) \
                        or not 0 <= data[name] <= 1 << 16:
                    raise ValueError(f'{name} = {data[name]!r}')
            values['max_age_s'] = float(data['max_age_s'])
            for name in ('order_bias', 'has_action_head'):
                if not isinstance(data[name], bool):
                    raise ValueError(f'{name} = {data[name]!r}')
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f'{source}: bad step spec ({exc})') from None
        spec = cls(**values)
        if spec.num_layers < 1 or spec.time_buckets < 2 or not spec.max_age_s > 0 or \
                spec.num_heads < 1 or spec.hidden_size % spec.num_heads or \
                spec.key_width != spec.value_width or \
                any(not 0 <= i < spec.num_layers for i in spec.cross_layers) or \
                any(not r > 0 for r in spec.decay_rates):
            raise CheckpointError(f'{source}: inconsistent step spec {data}')
        return spec
