"""Tests of loading BLIP-2 Q-Former weights (LAVIS and transformers names) into MemoryQFormer.

The name mapping is written out here on its own (not derived from blip2_key_map), and the loaded
Q-Former is checked against a plain BLIP-2 Q-Former forward written from the source weights.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from malmm_ros.config import model_preset
from malmm_ros.errors import CheckpointError
from malmm_ros.model.blip2 import load_blip2_qformer
from malmm_ros.model.memory import MemorySpec
from malmm_ros.model.qformer import MemoryQFormer

NUM_LAYERS = 2
HIDDEN, INTERMEDIATE, VISION, HEADS, QUERIES = 768, 3072, 1408, 12, 32
CONFIG = model_preset('blip2', num_layers=NUM_LAYERS, time_features=16,  # every time weight
                      value_decays=8)

# (LAVIS suffix, transformers suffix, our suffix, shape kind) of each layer's Linear/LayerNorm.
LAYER_NAMES = [
    ('attention.self.query', 'attention.attention.query', 'self_attention.query', 'hh'),
    ('attention.self.key', 'attention.attention.key', 'self_attention.key', 'hh'),
    ('attention.self.value', 'attention.attention.value', 'self_attention.value', 'hh'),
    ('attention.output.dense', 'attention.output.dense', 'self_attention.output', 'hh'),
    ('attention.output.LayerNorm', 'attention.output.LayerNorm', 'self_attention.norm', 'ln'),
    ('intermediate_query.dense', 'intermediate_query.dense', 'feed_forward.dense_in', 'ih'),
    ('output_query.dense', 'output_query.dense', 'feed_forward.dense_out', 'hi'),
    ('output_query.LayerNorm', 'output_query.LayerNorm', 'feed_forward.norm', 'ln'),
]
CROSS_NAMES = [  # only in layers 0, 2, 4, ... (BLIP-2's cross_attention_freq = 2)
    ('crossattention.self.query', 'crossattention.attention.query', 'cross_attention.query',
     'hh'),
    ('crossattention.self.key', 'crossattention.attention.key', 'cross_attention.key', 'hv'),
    ('crossattention.self.value', 'crossattention.attention.value', 'cross_attention.value',
     'hv'),
    ('crossattention.output.dense', 'crossattention.output.dense', 'cross_attention.output',
     'hh'),
    ('crossattention.output.LayerNorm', 'crossattention.output.LayerNorm',
     'cross_attention.norm', 'ln'),
]
TEXT_NAMES = [('intermediate.dense', 'ih'), ('output.dense', 'hi'), ('output.LayerNorm', 'ln')]
LAYER_PREFIX = {'lavis': 'Qformer.bert.encoder.layer.{i}.', 'hf': 'qformer.encoder.layer.{i}.'}
EMBED_NORM = {'lavis': 'Qformer.bert.embeddings.LayerNorm', 'hf': 'qformer.layernorm'}
IGNORED = {  # keys outside the query path, which must be skipped
    'lavis': {'Qformer.bert.embeddings.word_embeddings.weight': (50, HIDDEN),
              'Qformer.bert.embeddings.position_embeddings.weight': (40, HIDDEN),
              'Qformer.cls.predictions.bias': (50,),
              'ln_vision.weight': (VISION,), 'ln_vision.bias': (VISION,),
              'visual_encoder.cls_token': (1, 1, VISION), 'llm_proj.weight': (64, HIDDEN)},
    'hf': {'vision_model.post_layernorm.weight': (VISION,),
           'language_projection.weight': (64, HIDDEN), 'language_projection.bias': (64,)},
}
WEIGHT_SHAPES = {'hh': (HIDDEN, HIDDEN), 'hv': (HIDDEN, VISION), 'ih': (INTERMEDIATE, HIDDEN),
                 'hi': (HIDDEN, INTERMEDIATE), 'ln': (HIDDEN,)}


def _param(gen: torch.Generator, kind: str, part: str) -> torch.Tensor:
    """A random weight of `kind`; LayerNorms near one, Linear weights ~ 1/sqrt(fan_in)."""
    shape = WEIGHT_SHAPES[kind] if part == 'weight' else WEIGHT_SHAPES[kind][:1]
    noise = torch.randn(shape, generator=gen)
    if kind == 'ln':
        return 1.0 + 0.2 * noise if part == 'weight' else 0.2 * noise
    return noise / math.sqrt(WEIGHT_SHAPES[kind][1]) if part == 'weight' else 0.1 * noise


def _build(flavour: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(BLIP-2 state dict in `flavour` names, {our name: tensor it must land in})."""
    gen = torch.Generator().manual_seed(7)
    source: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}

    def add(theirs: str, ours: str | None, kind: str) -> None:
        for part in ('weight', 'bias'):
            tensor = _param(gen, kind, part)
            source[f'{theirs}.{part}'] = tensor
            if ours is not None:
                expected[f'{ours}.{part}'] = tensor

    queries = torch.randn(1, QUERIES, HIDDEN, generator=gen)
    source['query_tokens'] = queries
    expected['query_tokens'] = queries
    add(EMBED_NORM[flavour], 'embed_norm', 'ln')
    column = 0 if flavour == 'lavis' else 1
    for i in range(NUM_LAYERS):
        prefix = LAYER_PREFIX[flavour].format(i=i)
        names = LAYER_NAMES + (CROSS_NAMES if i % 2 == 0 else [])
        for entry in names:
            add(prefix + entry[column], f'layers.{i}.{entry[2]}', entry[3])
        for suffix, kind in TEXT_NAMES:
            add(prefix + suffix, None, kind)
    for name, shape in IGNORED[flavour].items():
        source[name] = torch.randn(shape, generator=gen)
    if flavour == 'lavis':
        source['Qformer.bert.embeddings.position_ids'] = torch.arange(40).view(1, -1)
    return source, expected


@pytest.fixture(scope='module', autouse=True)
def _one_thread():
    """Large float64 matmuls on one thread: a shared 2-core machine thrashes with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def lavis() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return _build('lavis')


@pytest.fixture(scope='module')
def hf() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return _build('hf')


@pytest.fixture(scope='module')
def qformer() -> MemoryQFormer:
    return MemoryQFormer(CONFIG)


def _scramble(qformer: MemoryQFormer) -> None:
    """Make every parameter, time-bias tables included, differ from any source weight."""
    with torch.no_grad():
        for param in qformer.parameters():
            param.fill_(0.5)


def _check_landed(qformer: MemoryQFormer, expected: dict[str, torch.Tensor]) -> None:
    state = qformer.state_dict()
    # Ours only, one per attention module: the time-bias table, the order-bias slopes and the
    # age-code projection.
    time_bias = {n for n in state if '.time_bias.' in n}
    order = {n for n in state if '.order_bias.' in n}
    age = {n for n in state if '.age.' in n}
    decays = {n for n in state if '.decay_out.' in n}
    assert len(time_bias) == len(order) == len(age) == NUM_LAYERS + (NUM_LAYERS + 1) // 2
    assert len(decays) == (NUM_LAYERS + 1) // 2  # cross-attention reads the decays
    assert set(state) == set(expected) | time_bias | order | age | decays, \
        'the mapping misses a weight'
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    for name in time_bias | order | age | decays:
        assert torch.count_nonzero(state[name]) == 0, name


@pytest.mark.parametrize('flavour', ['lavis', 'hf'])
def test_every_weight_lands(flavour: str, qformer: MemoryQFormer, request) -> None:
    source, expected = request.getfixturevalue(flavour)
    _scramble(qformer)
    load_blip2_qformer(qformer, source)
    _check_landed(qformer, expected)


def test_two_dimensional_query_tokens(hf, qformer: MemoryQFormer) -> None:
    source, expected = hf
    source = {**source, 'query_tokens': source['query_tokens'][0]}
    _scramble(qformer)
    load_blip2_qformer(qformer, source)
    _check_landed(qformer, expected)


def test_prefixed_query_tokens(lavis, qformer: MemoryQFormer) -> None:
    source, expected = lavis
    source = {('model.query_tokens' if k == 'query_tokens' else k): v for k, v in source.items()}
    _scramble(qformer)
    load_blip2_qformer(qformer, source)
    _check_landed(qformer, expected)


# Regression: transformers InstructBLIP names its embedding LayerNorm
# qformer.embeddings.layernorm (BLIP-2: qformer.layernorm); both must load.
def test_transformers_instructblip_names(hf, qformer: MemoryQFormer) -> None:
    source, expected = hf
    source = dict(source)
    for part in ('weight', 'bias'):
        source[f'qformer.embeddings.layernorm.{part}'] = source.pop(f'qformer.layernorm.{part}')
    source['qformer.embeddings.word_embeddings.weight'] = torch.zeros(50, HIDDEN)
    _scramble(qformer)
    load_blip2_qformer(qformer, source)
    _check_landed(qformer, expected)


# -- behaviour: one frame, empty memory == BLIP-2's Q-Former ---------------------------------


def _reference_qformer(source: dict[str, torch.Tensor], frames: torch.Tensor) -> torch.Tensor:
    """BLIP-2 Q-Former on query tokens only (LAVIS names), float64: post-norm BERT layers."""
    w = {k: v.double() for k, v in source.items() if k.startswith(('Qformer', 'query'))}

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ w[f'{name}.weight'].T + w[f'{name}.bias']

    def layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-12) * w[f'{name}.weight'] + w[f'{name}.bias']

    def attention(hidden: torch.Tensor, context: torch.Tensor, name: str) -> torch.Tensor:
        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(x.shape[0], x.shape[1], HEADS, -1).transpose(1, 2)

        q = heads(linear(hidden, f'{name}.self.query'))
        k = heads(linear(context, f'{name}.self.key'))
        v = heads(linear(context, f'{name}.self.value'))
        scores = q @ k.transpose(-1, -2) / math.sqrt(HIDDEN // HEADS)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(hidden.shape)
        return layer_norm(hidden + linear(out, f'{name}.output.dense'),
                          f'{name}.output.LayerNorm')

    batch = frames.shape[0]
    hidden = layer_norm(w['query_tokens'].expand(batch, -1, -1),
                        'Qformer.bert.embeddings.LayerNorm')
    for i in range(NUM_LAYERS):
        prefix = f'Qformer.bert.encoder.layer.{i}'
        hidden = attention(hidden, hidden, f'{prefix}.attention')
        if i % 2 == 0:
            hidden = attention(hidden, frames, f'{prefix}.crossattention')
        inner = linear(hidden, f'{prefix}.intermediate_query.dense')
        inner = 0.5 * inner * (1.0 + torch.erf(inner / math.sqrt(2.0)))  # exact GELU
        hidden = layer_norm(hidden + linear(inner, f'{prefix}.output_query.dense'),
                            f'{prefix}.output_query.LayerNorm')
    return hidden


def test_single_frame_equals_blip2_forward(lavis) -> None:
    source, _ = lavis
    model = MemoryQFormer(CONFIG)
    _scramble(model)
    load_blip2_qformer(model, source)
    model = model.double().eval()
    frames = torch.randn(2, 10, VISION, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64)
    expected = _reference_qformer(source, frames)
    for cache_projections in (True, False):
        memory = model.new_memory(MemorySpec(4, cache_projections=cache_projections))
        with torch.no_grad():
            got = model.step(frames, 12.5, memory)
        assert got.shape == (2, QUERIES, HIDDEN) and got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    assert not torch.allclose(expected[0], expected[1])  # the frames matter


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ('drop', 'ours'),
    [
        ('Qformer.bert.encoder.layer.0.crossattention.self.key.bias',
         'layers.0.cross_attention.key.bias'),
        ('Qformer.bert.encoder.layer.1.output_query.LayerNorm.weight',
         'layers.1.feed_forward.norm.weight'),
        ('Qformer.bert.embeddings.LayerNorm.bias', 'embed_norm.bias'),
        ('query_tokens', 'query_tokens'),
    ],
)
def test_missing_key(lavis, qformer: MemoryQFormer, drop: str, ours: str) -> None:
    source, _ = lavis
    source = {k: v for k, v in source.items() if k != drop}
    _scramble(qformer)
    with pytest.raises(CheckpointError, match=rf"missing \[.*'{re.escape(ours)}'"):
        load_blip2_qformer(qformer, source, source='blip2.pth')
    assert all(torch.all(p == 0.5) for p in qformer.parameters()), 'partially loaded'


@pytest.mark.parametrize(
    ('key', 'shape', 'ours', 'ours_shape'),
    [
        ('Qformer.bert.encoder.layer.0.crossattention.self.key.weight', (HIDDEN, 1024),
         'layers.0.cross_attention.key.weight', (HIDDEN, VISION)),
        ('qformer.encoder.layer.1.intermediate_query.dense.bias', (100,),
         'layers.1.feed_forward.dense_in.bias', (INTERMEDIATE,)),
        ('query_tokens', (1, 16, HIDDEN), 'query_tokens', (1, QUERIES, HIDDEN)),
    ],
)
def test_wrong_shape(lavis, hf, qformer: MemoryQFormer, key: str, shape: tuple, ours: str,
                     ours_shape: tuple) -> None:
    source = dict((hf if key.startswith('qformer.') else lavis)[0])
    source[key] = torch.zeros(shape)
    _scramble(qformer)
    message = re.escape(f'{key} {shape} -> {ours} {ours_shape}')
    with pytest.raises(CheckpointError, match=rf'^blip2\.pth .*wrong shapes.*{message}'):
        load_blip2_qformer(qformer, source, source='blip2.pth')
    assert all(torch.all(p == 0.5) for p in qformer.parameters()), 'partially loaded'


def test_unrelated_state_dict(qformer: MemoryQFormer) -> None:
    with pytest.raises(CheckpointError, match=r'does not fit the Q-Former: missing .*\.\.\.'):
        load_blip2_qformer(qformer, {'encoder.weight': torch.zeros(3)})


def test_shared_decay_channels_say_how_to_keep_blip2_values(lavis) -> None:
    """BLIP-2's value projections need every channel: with the decays inside them the shapes
    differ, and the error says which setting keeps them."""
    shared = MemoryQFormer(model_preset('blip2', num_layers=NUM_LAYERS, value_decays=8,
                                        decay_channels='shared'))
    with pytest.raises(CheckpointError, match=r'wrong shapes.*crossattention\.self\.value.*'
                                              r'model\.decay_channels: extra keeps every value '
                                              r'channel'):
        load_blip2_qformer(shared, dict(lavis[0]), source='blip2.pth')
