"""Export one MA-LMM step (adapter, memory-augmented Q-Former, heads) as an ONNX graph.

The graphs hold no state: the numpy memory (runtime/numpy_memory.py) keeps the banks, feeds
their rows in and writes what comes out. The projection graph turns the frame's encoder tokens
into its visual bank rows (adapter tokens, each cross-attention layer's keys and values with the
fresh decays), written into the bank's newest slot; the step graph then reads every bank (keys
and values cached by each attention layer, plus each row's age bucket, order place and mask)
and returns the query rows of this frame per layer, the query outputs and the probabilities.
The computation is model/qformer.py's cached path in plain operators.

    tokens -> projection -> visual bank
    query tokens -> per layer: self-attention over [query bank ; current queries],
                    cross-attention over the visual bank, feed-forward -> heads

Names and shapes: runtime/step_spec.py.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from malmm_ros.errors import CheckpointError, ConfigError
from malmm_ros.files import atomic_write
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.model.qformer import MemoryAttention
from malmm_ros.model.time_encoding import decay_rates
from malmm_ros.runtime.step_spec import StepSpec

__all__ = ['ProjectionGraph', 'StepGraph', 'export_step', 'step_spec']

_log = logging.getLogger(__name__)


def step_spec(model: MalmmModel) -> StepSpec:
    """The StepSpec of `model` (refused for settings the graphs do not carry)."""
    config = model.config
    if config.time_features:
        raise ConfigError('the ONNX step does not carry model.time_features (the age code); '
                          'run this model with runtime: torch')
    layers = config.cross_attention_layers()
    attention = model.qformer.layers[layers[0]].cross_attention if layers else None
    per_head = 0 if attention is None else _cached_width(attention) // config.num_heads
    return StepSpec(
        num_layers=config.num_layers, num_heads=config.num_heads, num_tokens=model.num_tokens,
        feature_dim=model.feature_dim, encoder_width=config.encoder_width,
        hidden_size=config.hidden_size, num_queries=config.num_queries, cross_layers=layers,
        key_width=per_head, value_width=per_head,
        decay_rates=decay_rates(config.value_decays) if config.value_decays else (),
        time_buckets=config.time_buckets, max_age_s=config.max_age_s,
        order_bias=config.order_bias, has_action_head=model.heads.action is not None)


def _cached_width(attention: MemoryAttention) -> int:
    """Width of one cross-attention layer's cached keys (and values): with extra decays each
    head carries F more channels (zeros in the keys, the decays in the values)."""
    extra = attention.num_heads * attention.num_decays if attention.extra_decays else 0
    return attention.query.out_features + extra


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[R, heads * w] -> head-major [heads, R, w]."""
    return x.unflatten(-1, (heads, -1)).transpose(0, 1)


class ProjectionGraph(nn.Module):
    """Encoder tokens -> the frame's visual bank rows: its tokens and, per cross-attention
    layer, keys and values (each head's values followed by the fresh decays)."""

    def __init__(self, model: MalmmModel) -> None:
        super().__init__()
        self.model = model
        self.spec = step_spec(model)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.spec.projection_inputs(), inputs, strict=True))
        visual = self.model.adapter(named['tokens'])[0]  # (N, C)
        out = [visual]
        for index in self.spec.cross_layers:
            attention = self.model.qformer.layers[index].cross_attention
            heads = attention.num_heads
            key = _heads(F.linear(visual, *attention._weights()[1]), heads)  # (h, N, w)
            value = _heads(attention.value(visual), heads)
            if attention.num_decays:
                fresh = named['decay_fresh'].view(1, 1, -1).expand(heads, visual.shape[0], -1)
                value = torch.cat([value, fresh], dim=-1)
            out.append(torch.cat([key, value]))  # (2h, N, w): the bank's field
        return tuple(out)


class StepGraph(nn.Module):
    """Every bank's rows (the frame's visual rows already written) -> each layer's query rows
    of this frame, the query outputs and the probabilities (StepSpec names)."""

    def __init__(self, model: MalmmModel) -> None:
        super().__init__()
        self.model = model
        self.spec = step_spec(model)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        named = dict(zip(self.spec.step_inputs(), inputs, strict=True))
        qformer = self.model.qformer
        hidden = qformer.embed_norm(qformer.query_tokens)[0]  # (Q, D)
        out: list[torch.Tensor] = []
        for index, layer in enumerate(qformer.layers):
            attention = layer.self_attention
            heads = attention.num_heads
            key = _heads(F.linear(hidden, *attention._weights()[1]), heads)  # (h, Q, w)
            value = _heads(attention.value(hidden), heads)
            out += [hidden, torch.cat([key, value])]
            prefix = f'query{index}'
            # The current queries are not in the bank yet: their rows join here (age 0,
            # place 0: bucket 0 and no order term).
            hidden = _attend(attention, hidden,
                             torch.cat([named[f'{prefix}_k'], key], dim=1),
                             torch.cat([named[f'{prefix}_v'], value], dim=1),
                             _bias(attention, named[f'{prefix}_buckets'],
                                   named.get(f'{prefix}_places'), named[f'{prefix}_mask'],
                                   hidden.shape[0]), None)
            if layer.cross_attention is not None:
                attention = layer.cross_attention
                hidden = _attend(attention, hidden, named[f'cross{index}_k'],
                                 named[f'cross{index}_v'],
                                 _bias(attention, named['visual_buckets'],
                                       named.get('visual_places'), named['visual_mask'], 0),
                                 named.get('decay_scale'))
            hidden = layer.feed_forward(hidden)
        logits = self.model.heads(hidden.unsqueeze(0))
        out += [hidden, logits.verb[0].softmax(-1), logits.noun[0].softmax(-1)]
        if logits.action is not None:
            out.append(logits.action[0].softmax(-1))
        return tuple(out)


def _bias(attention: MemoryAttention, buckets: torch.Tensor, places: torch.Tensor | None,
          mask: torch.Tensor, current: int) -> torch.Tensor:
    """[heads, 1, rows (+ current)]: each stored row's age-bucket bias, order term and mask,
    then `current` rows of age 0 (bucket 0, place 0)."""
    table = attention.time_bias.table.T  # (h, buckets)
    bias = table.index_select(1, buckets)  # (h, rows)
    if attention.order_bias is not None and places is not None:
        bias = bias + attention.order_bias.slope.unsqueeze(1) * places
    bias = bias + mask
    if current:
        bias = torch.cat([bias, table[:, :1].expand(-1, current)], dim=1)
    return bias.unsqueeze(1)


def _attend(attention: MemoryAttention, hidden: torch.Tensor, keys: torch.Tensor,
            values: torch.Tensor, bias: torch.Tensor,
            decay_scale: torch.Tensor | None) -> torch.Tensor:
    """MemoryAttention.forward's cached path: hidden [Q, D] over head-major keys and values
    [h, rows, w]; `decay_scale` [w] (ones, then this step's decay factors) ages the decays
    the heads returned."""
    heads = attention.num_heads
    head_dim = hidden.shape[-1] // heads
    query_proj, _, output_proj = attention._weights()
    q = _heads(F.linear(hidden, *query_proj), heads)  # (h, Q, w)
    scores = torch.matmul(q, keys.transpose(1, 2)) * head_dim ** -0.5 + bias
    out = torch.matmul(scores.softmax(-1), values)  # (h, Q, w)
    if decay_scale is not None and attention.num_decays:
        out = out * decay_scale
    out = out.transpose(0, 1).flatten(1)  # (Q, h * w)
    return attention.norm(hidden + F.linear(out, *output_proj))


def example_inputs(spec: StepSpec, capacity: int) -> dict[str, torch.Tensor]:
    """Inputs of both graphs for a bank of `capacity` slots, every row masked."""
    visual_rows = (capacity + 1) * spec.num_tokens
    query_rows = (capacity + 1) * spec.num_queries
    values = {'tokens': torch.zeros(1, spec.num_tokens, spec.feature_dim),
              'decay_fresh': torch.ones(len(spec.decay_rates)),
              'decay_scale': torch.ones(spec.value_width)}
    for prefix, rows in [('visual', visual_rows)] + [
            (f'query{layer}', query_rows) for layer in range(spec.num_layers)]:
        values[f'{prefix}_buckets'] = torch.zeros(rows, dtype=torch.long)
        values[f'{prefix}_places'] = torch.zeros(rows)
        values[f'{prefix}_mask'] = torch.full((rows,), -1.0e4)
    for layer in spec.cross_layers:
        for part in ('k', 'v'):
            values[f'cross{layer}_{part}'] = torch.zeros(spec.num_heads, visual_rows,
                                                         spec.key_width)
    heads, width = spec.query_fields()['kv']
    for layer in range(spec.num_layers):
        for part in ('k', 'v'):
            values[f'query{layer}_{part}'] = torch.zeros(heads // 2, query_rows, width)
    return values


def export_step(model: MalmmModel, projection_path: str | os.PathLike,
                step_path: str | os.PathLike, *, capacity: int = 20,
                opset: int = 17) -> StepSpec:
    """Write `model`'s projection and step graphs (checked with onnx.checker). The stored-row
    axes are dynamic, so any memory length runs them. Returns their StepSpec."""
    if next(model.parameters()).dtype != torch.float32:
        raise ConfigError('export the step graphs from a float32 model')
    model = model.eval()
    projection, step = ProjectionGraph(model), StepGraph(model)
    spec = step.spec
    values = example_inputs(spec, capacity)
    dynamic: dict[str, dict[int, str]] = {}
    for name in spec.step_inputs():
        shape = values[name].shape
        if name.startswith('visual') or name.startswith('cross'):
            dynamic[name] = {len(shape) - (2 if len(shape) == 3 else 1): 'visual_rows'}
        elif name.startswith('query'):
            dynamic[name] = {len(shape) - (2 if len(shape) == 3 else 1): 'query_rows'}
    for graph, path, inputs, outputs, axes in (
            (projection, projection_path, spec.projection_inputs(), spec.projection_outputs(),
             {}),
            (step, step_path, spec.step_inputs(), spec.step_outputs(), dynamic)):
        _export(graph, Path(path), tuple(values[name] for name in inputs), inputs, outputs,
                axes, opset)
    _log.info('exported the step graphs to %s and %s (%d layers, %d queries)', projection_path,
              step_path, spec.num_layers, spec.num_queries)
    return spec


def _export(graph: nn.Module, path: Path, args: tuple[torch.Tensor, ...], inputs: list[str],
            outputs: list[str], dynamic: dict[str, dict[int, str]], opset: int) -> None:
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the TorchScript exporter's deprecation notice
        torch.onnx.export(graph, args, buffer, input_names=inputs, output_names=outputs,
                          opset_version=opset, dynamo=False, dynamic_axes=dynamic or None)
    proto = onnx.load_model_from_string(buffer.getvalue())
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise CheckpointError(f'exported graph {path.name} failed onnx.checker: {exc}'
                              ) from None
    try:
        atomic_write(path, proto.SerializeToString())
    except OSError as exc:
        raise ConfigError(f'cannot write {path} ({exc.strerror or exc})') from None
