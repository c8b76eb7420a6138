"""Load a BLIP-2 / InstructBLIP Q-Former state dict into MemoryQFormer (`blip2` preset).

Key mapping. A key is first stripped of its prefix (LAVIS `Qformer.bert.`, transformers
`qformer.`); `L` is a layer index, `X` is `attention` (-> self_attention) or `crossattention`
(-> cross_attention):

    query_tokens                              -> query_tokens
    embeddings.LayerNorm (LAVIS), layernorm,
    embeddings.layernorm (InstructBLIP)       -> embed_norm
    encoder.layer.L.X.self.{query,key,value}  -> layers.L.<X>.{query,key,value}   (LAVIS)
    encoder.layer.L.X.attention.{q,k,v}       -> layers.L.<X>.{query,key,value}   (transformers)
    encoder.layer.L.X.output.dense            -> layers.L.<X>.output
    encoder.layer.L.X.output.LayerNorm        -> layers.L.<X>.norm
    encoder.layer.L.intermediate_query.dense  -> layers.L.feed_forward.dense_in
    encoder.layer.L.output_query.dense        -> layers.L.feed_forward.dense_out
    encoder.layer.L.output_query.LayerNorm    -> layers.L.feed_forward.norm

Not mapped: the text branch (word/position embeddings, `intermediate`/`output` of the text
tokens), which queries never use, and each attention's time weights (the `time_bias` table,
the `order_bias` slopes, the `age` and `decay_out` projections), which BLIP-2 lacks: they stay
zero, so a single frame with empty memory behaves exactly as the BLIP-2 Q-Former.
BLIP-2's `ln_vision` normalises EVA-CLIP features (1408 wide) and has no counterpart for our
encoder; the visual adapter is trained instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from malmm_ros.errors import CheckpointError
from malmm_ros.model.qformer import MemoryQFormer

__all__ = ['blip2_key_map', 'load_blip2_qformer']

_PREFIXES = ('Qformer.bert.', 'qformer.')
_RULES = (
    (r'embeddings\.LayerNorm\.(weight|bias)', r'embed_norm.\1'),
    (r'layernorm\.(weight|bias)', r'embed_norm.\1'),
    (r'embeddings\.layernorm\.(weight|bias)', r'embed_norm.\1'),  # transformers InstructBLIP
    (r'encoder\.layer\.(\d+)\.attention\.(?:self|attention)\.(query|key|value)\.(weight|bias)',
     r'layers.\1.self_attention.\2.\3'),
    (r'encoder\.layer\.(\d+)\.crossattention\.(?:self|attention)\.(query|key|value)\.'
     r'(weight|bias)', r'layers.\1.cross_attention.\2.\3'),
    (r'encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)',
     r'layers.\1.self_attention.output.\2'),
    (r'encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)',
     r'layers.\1.self_attention.norm.\2'),
    (r'encoder\.layer\.(\d+)\.crossattention\.output\.dense\.(weight|bias)',
     r'layers.\1.cross_attention.output.\2'),
    (r'encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.(weight|bias)',
     r'layers.\1.cross_attention.norm.\2'),
    (r'encoder\.layer\.(\d+)\.intermediate_query\.dense\.(weight|bias)',
     r'layers.\1.feed_forward.dense_in.\2'),
    (r'encoder\.layer\.(\d+)\.output_query\.dense\.(weight|bias)',
     r'layers.\1.feed_forward.dense_out.\2'),
    (r'encoder\.layer\.(\d+)\.output_query\.LayerNorm\.(weight|bias)',
     r'layers.\1.feed_forward.norm.\2'),
)


def blip2_key_map(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{BLIP-2 key: our key} for every key of `state_dict` that the Q-Former uses."""
    mapping = {}
    for key in state_dict:
        if key == 'query_tokens' or key.endswith('.query_tokens'):
            mapping[key] = 'query_tokens'
            continue
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        if prefix is None:
            continue
        rest = key[len(prefix):]
        for pattern, target in _RULES:
            if re.fullmatch(pattern, rest):
                mapping[key] = re.sub(pattern, target, rest)
                break
    return mapping


def load_blip2_qformer(qformer: MemoryQFormer, state_dict: Mapping[str, torch.Tensor],
                       *, source: str = '<state dict>') -> None:
    """Copy BLIP-2 Q-Former weights into `qformer`; every Q-Former weight must be found.

    Missing weights, shape mismatches and Q-Former weights with no counterpart (a 12-layer state
    dict into a 2-layer config) raise CheckpointError naming them; our time parameters (bias
    tables, age-code projections) are the only ones allowed to stay unset: they are zeroed, so
    the loaded Q-Former computes what BLIP-2's does on a single frame.
    """
    mapping = blip2_key_map(state_dict)
    ours = qformer.state_dict()
    loaded = {}
    shapes: list[str] = []
    extra: list[str] = []
    for key, name in mapping.items():
        if name not in ours:  # more layers, or cross-attention where ours has none
            extra.append(key)
            continue
        tensor = state_dict[key]
        if name == 'query_tokens' and tensor.dim() == 2:
            tensor = tensor.unsqueeze(0)
        if tensor.shape != ours[name].shape:
            shapes.append(f'{key} {tuple(tensor.shape)} -> {name} {tuple(ours[name].shape)}')
            continue
        loaded[name] = tensor
    ours_only = ('.time_bias.', '.age.', '.order_bias.', '.decay_out.')
    missing = sorted(n for n in ours if n not in loaded and not any(t in n for t in ours_only))
    if shapes or missing or extra:
        details = []
        if extra:
            details.append(f'weights with no place in this config (check num_layers and '
                           f'cross_attention_every) {extra[:4]}{" ..." if len(extra) > 4 else ""}')
        if missing:
            details.append(f'missing {missing[:6]}{" ..." if len(missing) > 6 else ""}')
        if shapes:
            details.append(f'wrong shapes {shapes[:4]}')
            if any('.value.' in shape for shape in shapes) and qformer.config.value_decays \
                    and qformer.config.decay_channels == 'shared':
                details.append('model.decay_channels: extra keeps every value channel (the '
                               'blip2 preset sets it)')
        raise CheckpointError(f'{source} does not fit the Q-Former: ' + '; '.join(details))
    with torch.no_grad():
        for name, tensor in loaded.items():
            ours[name].copy_(tensor)
        for module_name, module in qformer.named_modules():
            if module_name.endswith('time_bias'):
                module.table.zero_()
            elif module_name.endswith('.age'):
                module.weight.zero_()
            elif module_name.endswith('order_bias'):
                module.slope.zero_()
            elif module_name.endswith('decay_out'):
                module.weight.zero_()
