"""Tests of the memory-augmented Q-Former against an independent recompute-everything reference.

The reference keeps the raw history of every bank, compresses it with a loop MBC and computes
every attention with an explicit softmax in float64, from the module's own weights.
"""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from malmm_ros.config import ModelConfig, model_preset
from malmm_ros.model.memory import MemorySpec, StreamMemory
from malmm_ros.model.qformer import MemoryAttention, MemoryQFormer
from malmm_ros.model.time_encoding import age_buckets

SMALL = {'num_layers': 3, 'hidden_size': 32, 'num_heads': 4, 'intermediate_size': 64,
         'num_queries': 8, 'encoder_width': 24, 'cross_attention_every': 2,
         'value_decays': 4}  # of each head's 8 value channels
TOKENS = 7  # visual token positions per frame
BATCH = 2
TIE = 1e-12

pytestmark = pytest.mark.usefixtures('single_thread')


# -- reference MBC (same rule as test_memory.py's, kept local so each file stands alone) -------


def ref_cosine(u: np.ndarray, v: np.ndarray) -> float:
    dot = float(np.dot(u, v))
    norm_u = max(math.sqrt(float(np.dot(u, u))), 1e-12)
    norm_v = max(math.sqrt(float(np.dot(v, v))), 1e-12)
    return dot / (norm_u * norm_v)


def ref_compress(tokens: np.ndarray, counts: np.ndarray, times: np.ndarray,
                 members: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One MBC step by loops over (b, n): tokens [B,T,N,C], counts and times [B,T,N], members
    [B,T,N,K] (each slot's share of every frame seen: 1 / count for the frames it holds).

    Similarities within TIE of the best are ties (exact-arithmetic semantics): the first wins.
    """
    batch, slots, positions, width = tokens.shape
    out_tokens = np.zeros((batch, slots - 1, positions, width))
    out_counts = np.zeros((batch, slots - 1, positions))
    out_times = np.zeros((batch, slots - 1, positions))
    out_members = np.zeros((batch, slots - 1, positions, members.shape[-1]))
    for b in range(batch):
        for n in range(positions):
            sims = [ref_cosine(tokens[b, t, n], tokens[b, t + 1, n]) for t in range(slots - 1)]
            k = next(t for t, sim in enumerate(sims) if sim >= max(sims) - TIE)
            c_k, c_next = counts[b, k, n], counts[b, k + 1, n]
            keep = [t for t in range(slots) if t not in (k, k + 1)]
            rows = [*keep[:k], None, *keep[k:]]  # None marks the merged slot
            for new, old in enumerate(rows):
                if old is None:
                    total = c_k + c_next
                    out_tokens[b, new, n] = (c_k * tokens[b, k, n]
                                             + c_next * tokens[b, k + 1, n]) / total
                    out_counts[b, new, n] = total
                    out_times[b, new, n] = (c_k * times[b, k, n]
                                            + c_next * times[b, k + 1, n]) / total
                    out_members[b, new, n] = (c_k * members[b, k, n]
                                              + c_next * members[b, k + 1, n]) / total
                else:
                    out_tokens[b, new, n] = tokens[b, old, n]
                    out_counts[b, new, n] = counts[b, old, n]
                    out_times[b, new, n] = times[b, old, n]
                    out_members[b, new, n] = members[b, old, n]
    return out_tokens, out_counts, out_times, out_members


class RefBank:
    """Raw stored slots (oldest first) with counts, count-weighted mean times and which frames
    each slot holds (for the decays: a merged slot's is the mean of its frames')."""

    MAX_FRAMES = 64

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.tokens: np.ndarray | None = None
        self.counts: np.ndarray | None = None
        self.times: np.ndarray | None = None
        self.members: np.ndarray | None = None  # [B, T, N, MAX_FRAMES]
        self.stamps: list[float] = []  # time of every frame pushed

    def context(self, current: torch.Tensor, now_s: float, taus: np.ndarray
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys/values source [B, S, N, C] = stored slots then the current frame, with ages and
        decays [B, S, N, len(taus)]: each slot's mean over its frames of exp(-age / tau)."""
        decay = np.exp(-(now_s - np.array([*self.stamps, now_s]))[:, None] / taus)  # (K+1, F)
        current = current.detach()
        zero = torch.zeros(current.shape[:2], dtype=torch.float64)[:, None]
        now = np.zeros((*current.shape[:2], len(self.stamps) + 1))
        now[..., -1] = 1.0
        if self.tokens is None:
            return current[:, None], zero, torch.from_numpy(now[:, None] @ decay)
        tokens = torch.cat([torch.from_numpy(self.tokens), current[:, None]], dim=1)
        ages = torch.cat([now_s - torch.from_numpy(self.times), zero], dim=1)
        held = self.members[..., :len(self.stamps)]
        members = np.concatenate([np.concatenate([held, np.zeros((*held.shape[:3], 1))], -1),
                                  now[:, None]], axis=1)
        return tokens, ages, torch.from_numpy(members @ decay)

    def push(self, current: torch.Tensor, now_s: float) -> None:
        new = current.detach().numpy()[:, None]
        ones = np.ones(new.shape[:3])
        member = np.zeros((*new.shape[:3], self.MAX_FRAMES))
        member[..., len(self.stamps)] = 1.0
        self.stamps.append(now_s)
        if self.tokens is None:
            self.tokens, self.counts, self.times = new, ones, ones * now_s
            self.members = member
        else:
            self.tokens = np.concatenate([self.tokens, new], axis=1)
            self.counts = np.concatenate([self.counts, ones], axis=1)
            self.times = np.concatenate([self.times, ones * now_s], axis=1)
            self.members = np.concatenate([self.members, member], axis=1)
        if self.capacity is not None and self.tokens.shape[1] > self.capacity:
            self.tokens, self.counts, self.times, self.members = ref_compress(
                self.tokens, self.counts, self.times, self.members)


# -- reference Q-Former -----------------------------------------------------------------------


def ref_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def ref_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def ref_age_code(ages: np.ndarray, features: int) -> np.ndarray:
    """[..., features]: exp(-age / tau) for F/2 taus, then (sin, cos) of 2 pi age / T for F/4
    periods; taus and periods geometric in [0.5, 2000] s."""
    def geometric(count: int) -> np.ndarray:
        return 0.5 * (4000.0 ** (np.arange(count) / max(count - 1, 1)))

    age = np.maximum(ages, 0.0)[..., None]
    angle = age * 2 * np.pi / geometric(features // 4)
    return np.concatenate([np.exp(-age / geometric(features // 2)), np.sin(angle),
                           np.cos(angle)], axis=-1)


def ref_attention(att: MemoryAttention, hidden: torch.Tensor, source: torch.Tensor,
                  ages: torch.Tensor, decays: torch.Tensor, config: ModelConfig,
                  capacity: int | None) -> torch.Tensor:
    """Post-norm residual multi-head attention of hidden [B,Q,D] over source [B,S,N,C], whose
    slots are oldest first at every position (the reference banks keep that order)."""
    batch, num_q, width = hidden.shape
    heads = config.num_heads
    head_dim = width // heads
    flat = source.reshape(batch, -1, source.shape[-1])  # (B, S*N, C)
    q = ref_linear(att.query, hidden).view(batch, num_q, heads, head_dim).permute(0, 2, 1, 3)
    k, v = ref_linear(att.key, flat), ref_linear(att.value, flat)  # (B, S*N, D), (.., value)
    if config.time_features:  # the age code, written out: sin/cos of 2 pi age / T
        code = torch.from_numpy(ref_age_code(ages.reshape(batch, -1).numpy(),
                                             config.time_features)).to(k.dtype)
        k = k + code @ att.age.weight[:width].T
        v = v + code @ att.age.weight[width:].T
    k = k.view(batch, -1, heads, head_dim).permute(0, 2, 1, 3)
    v = v.view(batch, -1, heads, v.shape[-1] // heads).permute(0, 2, 1, 3)
    shared = att.num_decays and config.decay_channels == 'shared'
    if shared:  # each head's values end with the token's decays
        per_token = decays.reshape(batch, 1, -1, config.value_decays).expand(-1, heads, -1, -1)
        v = torch.cat([v, per_token.to(v.dtype)], dim=-1)
    buckets = age_buckets(ages.reshape(batch, -1), config.time_buckets, config.max_age_s)
    table = att.time_bias.table  # (buckets, heads)
    bias = torch.stack([table[buckets[b]].T for b in range(batch)])  # (B, heads, S*N)
    if config.order_bias:  # slope per head times the place: 0 newest, 1 at slot M - 1
        slots, positions = source.shape[1], source.shape[2]
        span = max((capacity if capacity is not None else slots) - 1, 1)
        places = (slots - 1 - torch.arange(slots, dtype=bias.dtype)) / span
        places = places.repeat_interleave(positions)  # (S*N,), slot-major like `flat`
        bias = bias + att.order_bias.slope.view(1, heads, 1) * places.view(1, 1, -1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias[:, :, None, :]
    scores = scores - scores.amax(-1, keepdim=True)
    weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
    context = (weights @ v).permute(0, 2, 1, 3).reshape(batch, num_q, width)
    out = hidden + ref_linear(att.output, context)
    if att.decay_out is not None:  # extra: each head's attention-weighted decays, projected
        timing = weights @ decays.reshape(batch, 1, -1, config.value_decays)  # (B, h, Q, F)
        out = out + timing.permute(0, 2, 1, 3).reshape(batch, num_q, -1) @ att.decay_out.weight.T
    return ref_layer_norm(att.norm, out)


class RefQFormer:
    """Recompute-everything Q-Former step over raw (reference-compressed) histories."""

    def __init__(self, q: MemoryQFormer, capacity: int | None) -> None:
        self.q = q
        self.capacity = capacity
        self.visual = RefBank(capacity)
        self.queries = [RefBank(capacity) for _ in q.layers]

    @torch.no_grad()
    def step(self, visual: torch.Tensor, now_s: float) -> torch.Tensor:
        config = self.q.config
        hidden = ref_layer_norm(self.q.embed_norm,
                                self.q.query_tokens.expand(visual.shape[0], -1, -1))
        inputs = []
        # tau geometric from 0.5 s to 2,000 s (one decay: their geometric mean)
        taus = (np.geomspace(0.5, 2000.0, config.value_decays) if config.value_decays != 1
                else np.array([math.sqrt(1000.0)]))
        for i, layer in enumerate(self.q.layers):
            inputs.append(hidden)
            source, ages, decays = self.queries[i].context(hidden, now_s, taus)
            hidden = ref_attention(layer.self_attention, hidden, source, ages, decays, config,
                                   self.capacity)
            if i % config.cross_attention_every == 0:
                source, ages, decays = self.visual.context(visual, now_s, taus)
                hidden = ref_attention(layer.cross_attention, hidden, source, ages, decays,
                                       config, self.capacity)
            ff = layer.feed_forward
            inner = ref_linear(ff.dense_in, hidden)
            inner = 0.5 * inner * (1 + torch.erf(inner / math.sqrt(2)))
            hidden = ref_layer_norm(ff.norm, hidden + ref_linear(ff.dense_out, inner))
        for bank, entry in zip(self.queries, inputs, strict=True):
            bank.push(entry, now_s)
        self.visual.push(visual, now_s)
        return hidden


# -- helpers ----------------------------------------------------------------------------------


def build(seed: int = 0, **overrides: int) -> MemoryQFormer:
    """A small float64 Q-Former with random time-bias tables and non-identity LayerNorms."""
    torch.manual_seed(seed)
    q = MemoryQFormer(ModelConfig(**{**SMALL, **overrides})).double().eval()
    with torch.no_grad():
        for name, p in q.named_parameters():
            if 'time_bias' in name or 'order_bias' in name:
                nn.init.normal_(p, std=0.5)
            elif 'norm' in name:
                p.add_(0.2 * torch.randn_like(p))
    return q


def frames(count: int, seed: int, width: int = 24, batch: int = BATCH) -> torch.Tensor:
    """[count, B, N, width] float64 visual tokens: a random walk plus noise."""
    gen = torch.Generator().manual_seed(seed)
    walk = torch.randn(count, batch, TOKENS, width, generator=gen, dtype=torch.float64)
    noise = torch.randn(count, batch, TOKENS, width, generator=gen, dtype=torch.float64)
    return 0.5 * walk.cumsum(0) + noise


def irregular_times(count: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    gaps = 0.2 + 4.8 * torch.rand(count, generator=gen, dtype=torch.float64)
    return (gaps.cumsum(0) + 10.0).tolist()


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize('cache', [True, False])
@pytest.mark.parametrize(('capacity', 'steps', 'overrides'), [
    (4, 60, {}),
    (1, 30, {'num_layers': 2, 'cross_attention_every': 1, 'num_queries': 5}),
    (None, 25, {'num_layers': 2}),
    (4, 40, {'time_features': 16}),  # the optional age code
    (4, 30, {'order_bias': False}),  # as checkpoints from before the order bias
    (4, 40, {'value_decays': 6}),  # decays in the last value channels of each head
    (None, 20, {'value_decays': 3, 'num_layers': 2}),
    (2, 20, {'value_decays': 1, 'num_layers': 1}),
    (4, 40, {'value_decays': 8, 'decay_channels': 'extra'}),  # decays after the values
    (None, 20, {'value_decays': 3, 'num_layers': 2, 'decay_channels': 'extra'}),
    (4, 30, {'value_decays': 4, 'time_features': 8}),  # both, shared
    (4, 30, {'value_decays': 4, 'time_features': 8, 'decay_channels': 'extra'}),
])
def test_step_matches_reference(cache: bool, capacity: int | None, steps: int,
                                overrides: dict[str, int]) -> None:
    q = build(seed=1, **overrides)
    for i, layer in enumerate(q.layers):
        assert (layer.cross_attention is not None) == (i % q.config.cross_attention_every == 0)
    memory = q.new_memory(MemorySpec(capacity, cache_projections=cache))
    ref = RefQFormer(q, capacity)
    xs, times = frames(steps, seed=2), irregular_times(steps, seed=3)
    with torch.no_grad():
        for i in range(steps):
            out = q.step(xs[i], times[i], memory)
            expected = ref.step(xs[i], times[i])
            assert out.shape == (BATCH, q.config.num_queries, q.config.hidden_size)
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-9,
                                       msg=lambda m, i=i: f'step {i}: {m}')
    assert len(memory) == (steps if capacity is None else capacity)
    for bank, ref_bank in [(memory.visual, ref.visual),
                           *zip(memory.queries, ref.queries, strict=True)]:
        np.testing.assert_allclose(bank.tokens.numpy(), ref_bank.tokens, rtol=0, atol=1e-9)
        np.testing.assert_allclose(bank.counts.numpy(), ref_bank.counts, rtol=0, atol=0)
        np.testing.assert_allclose(bank.times.numpy(), ref_bank.times, rtol=0, atol=1e-9)
    assert memory.frames_seen == steps


# Regression: layer 0's query bank stores the same embed_norm(query_tokens) every step;
# its merges must follow the first-pair tie rule, not float rounding.
def test_layer0_query_bank_follows_first_pair_on_ties() -> None:
    q = build(seed=1)
    memory = q.new_memory(MemorySpec(4))
    ref = RefQFormer(q, 4)
    xs, times = frames(20, seed=2), irregular_times(20, seed=3)
    with torch.no_grad():
        for i in range(20):
            out, expected = q.step(xs[i], times[i], memory), ref.step(xs[i], times[i])
            torch.testing.assert_close(memory.queries[0].counts.numpy(), ref.queries[0].counts,
                                       rtol=0, atol=0, msg=lambda m, i=i: f'step {i}: {m}')
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-9,
                                       msg=lambda m, i=i: f'step {i}: {m}')
    assert ref.queries[0].counts[0].T.tolist() == [[17.0, 1.0, 1.0, 1.0]] * 8


@pytest.mark.parametrize('time', [{}, {'time_features': 16}, {'value_decays': 6},
                                  {'value_decays': 8, 'decay_channels': 'extra'}])
def test_cached_and_recomputed_projections_agree_over_a_long_stream(time: dict) -> None:
    q = build(seed=4, **time)
    cached = q.new_memory(MemorySpec(10))
    recompute = q.new_memory(MemorySpec(10, cache_projections=False))
    xs = frames(200, seed=5)
    worst = 0.0
    with torch.no_grad():
        for i in range(200):
            a = q.step(xs[i], 0.5 * i, cached)
            b = q.step(xs[i], 0.5 * i, recompute)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
            worst = max(worst, (a - b).abs().max().item())
    assert worst < 1e-11
    assert cached.visual.compressions == recompute.visual.compressions == 190
    # The cache stays exact: stored projections equal the projections of the merged tokens
    # (each head's channels; values end with the bank's decays, and with extra decays the
    # keys carry F zeros after each head's channels).
    with torch.no_grad():
        attentions = [(layer.cross_attention, cached.visual) for layer in q.layers
                      if layer.cross_attention is not None]
        attentions += [(layer.self_attention, bank)
                       for layer, bank in zip(q.layers, cached.queries, strict=True)]
        for att, bank in attentions:
            heads = att.num_heads
            for name, proj in (('k', att.key), ('v', att.value)):
                extra = att.num_decays if name == 'v' or att.extra_decays else 0
                stored = bank.ordered(f'{att.cache_key}.{name}').unflatten(-1, (heads, -1))
                expected = proj(bank.tokens).unflatten(-1, (heads, -1))
                torch.testing.assert_close(stored[..., :stored.shape[-1] - extra], expected,
                                           rtol=0, atol=1e-12)
                if extra and name == 'k':
                    assert not stored[..., -extra:].any()
                elif extra:
                    decays = bank.ordered('decay') if bank.has('decay') else None
                    assert decays is None  # they live in the value field, one copy per head
                    assert torch.equal(stored[..., -extra:],
                                       stored[..., :1, -extra:].expand_as(stored[..., -extra:]))


def test_outputs_depend_on_ages_not_absolute_time() -> None:
    q = build(seed=6)
    xs = frames(80, seed=7)
    results = {}
    for offset, spacing in ((0.0, 1.0), (100_000.0, 1.0), (0.0, 7.0)):
        memory = q.new_memory(MemorySpec(10))
        with torch.no_grad():
            results[offset, spacing] = torch.stack(
                [q.step(xs[i], offset + spacing * i, memory) for i in range(80)])
    torch.testing.assert_close(results[100_000.0, 1.0], results[0.0, 1.0], rtol=0, atol=1e-12)
    # Not vacuous: the same frames at another spacing give other outputs once memory exists.
    assert (results[0.0, 7.0][1:] - results[0.0, 1.0][1:]).abs().amax() > 1e-3
    torch.testing.assert_close(results[0.0, 7.0][0], results[0.0, 1.0][0], rtol=0, atol=0)


@pytest.mark.parametrize('cache', [True, False])
def test_memory_size_is_constant_after_capacity(cache: bool) -> None:
    q = build(seed=8, num_layers=2)
    memory = q.new_memory(MemorySpec(10, cache_projections=cache))
    unbounded = q.new_memory(MemorySpec(None, cache_projections=cache))
    xs = frames(310, seed=9)
    sizes, unbounded_sizes = [], []
    with torch.no_grad():
        for i in range(310):
            q.step(xs[i], float(i), memory)
            sizes.append(memory.nbytes())
            if i < 40:
                q.step(xs[i], float(i), unbounded)
                unbounded_sizes.append(unbounded.nbytes())
    assert len(memory) == 10
    assert len(set(sizes[9:])) == 1
    assert unbounded_sizes[-1] > unbounded_sizes[9]  # control: without M the memory grows


def test_reset_restarts_the_stream() -> None:
    q = build(seed=10)
    xs = frames(40, seed=11)
    memory = q.new_memory(MemorySpec(4))
    with torch.no_grad():
        for i in range(25):
            q.step(xs[i], float(i), memory)
        memory.reset()
        assert memory.frames_seen == 0
        assert len(memory) == 0
        assert [len(bank) for bank in memory.queries] == [0] * q.config.num_layers
        fresh = q.new_memory(MemorySpec(4))
        for i in range(25, 40):
            torch.testing.assert_close(q.step(xs[i], float(i), memory),
                                       q.step(xs[i], float(i), fresh), rtol=0, atol=0)


def run_training_step(q: MemoryQFormer, cache: bool, input_grad: bool, warm: int = 8,
                      ) -> tuple[torch.Tensor, torch.Tensor, StreamMemory]:
    """Warm a memory (M=4) with `warm` frames, then one step with grad and backward; returns
    x, the loss weights and the memory as it was before the step."""
    q.train()
    q.zero_grad(set_to_none=True)
    memory = q.new_memory(MemorySpec(4, cache_projections=cache))
    xs = frames(warm + 1, seed=12)
    with torch.no_grad():
        for i in range(warm):
            q.step(xs[i], 0.5 * i, memory)
    before = copy.deepcopy(memory)
    x = xs[warm].clone().requires_grad_(input_grad)
    weights = torch.randn(BATCH, q.config.num_queries, q.config.hidden_size,
                          generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    loss = (q.step(x, 0.5 * warm, memory) * weights).sum()
    loss.backward()
    return x, weights, before


@pytest.mark.parametrize('cache', [True, False])
def test_gradients_reach_input_queries_and_cross_attention(cache: bool) -> None:
    q = build(seed=14)
    x, weights, before = run_training_step(q, cache, input_grad=True)
    cross = q.layers[0].cross_attention
    for grad in (x.grad, q.query_tokens.grad, cross.key.weight.grad, cross.value.weight.grad,
                 q.layers[1].self_attention.key.weight.grad):
        assert grad is not None
        assert grad.abs().amax() > 1e-8

    # Finite differences along a random direction, from the same memory (memory is constant).
    def loss_at(x_value: torch.Tensor) -> float:
        with torch.no_grad():
            return (q.step(x_value, 4.0, copy.deepcopy(before)) * weights).sum().item()

    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(15),
                            dtype=torch.float64)
    eps = 1e-6
    numeric = (loss_at(x.detach() + eps * direction)
               - loss_at(x.detach() - eps * direction)) / (2 * eps)
    analytic = (x.grad * direction).sum().item()
    assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-8)

    direction = torch.randn(q.query_tokens.shape, generator=torch.Generator().manual_seed(16),
                            dtype=torch.float64)
    original = q.query_tokens.detach().clone()
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            q.query_tokens.copy_(original + sign * eps * direction)
        values.append(loss_at(x.detach()))
    with torch.no_grad():
        q.query_tokens.copy_(original)
    numeric = (values[0] - values[1]) / (2 * eps)
    analytic = (q.query_tokens.grad * direction).sum().item()
    assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-8)


def gradients(q: MemoryQFormer, cache: bool, input_grad: bool, warm: int = 8
              ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor | None]]:
    x, _, _ = run_training_step(q, cache, input_grad, warm)
    return x.grad, {name: None if p.grad is None else p.grad.clone()
                    for name, p in q.named_parameters()}


def is_key_or_value(name: str) -> bool:
    return '.key.' in name or '.value.' in name


def test_cached_and_recompute_give_the_same_input_gradient() -> None:
    q = build(seed=17)
    x_cached, cached = gradients(q, cache=True, input_grad=True)
    x_recompute, recompute = gradients(q, cache=False, input_grad=True)
    torch.testing.assert_close(x_cached, x_recompute, rtol=0, atol=1e-9)
    for name in cached:
        torch.testing.assert_close(cached[name], recompute[name], rtol=0, atol=1e-9,
                                   msg=lambda m, name=name: f'{name}: {m}')
    assert cached['query_tokens'].abs().amax() > 1e-8


# Regression: in training, key/value weights get gradients through every stored slot with
# cached projections too (the cache is detached, so training recomputes from tokens).
@pytest.mark.parametrize('input_grad', [False, True], ids=['frozen_input', 'trainable_input'])
def test_cached_key_value_weight_gradients_match_recompute(input_grad: bool) -> None:
    q = build(seed=18)
    _, cached = gradients(q, cache=True, input_grad=input_grad, warm=3)
    _, recompute = gradients(q, cache=False, input_grad=input_grad, warm=3)
    for name in sorted(filter(is_key_or_value, cached), key=lambda n: 'cross' not in n):
        assert recompute[name] is not None
        assert cached[name] is not None, f'{name} gets no gradient with cached projections'
        torch.testing.assert_close(cached[name], recompute[name], rtol=1e-9, atol=1e-9,
                                   msg=lambda m, name=name: f'{name}: {m}')


# Regression: recompute-mode training with a frozen input and a full bank must not trip
# autograd's in-place check when the bank compresses after the step.
def test_recompute_training_with_frozen_input_at_capacity_backpropagates() -> None:
    q = build(seed=22)
    run_training_step(q, cache=False, input_grad=False, warm=8)
    for layer in q.layers:
        if layer.cross_attention is not None:
            assert layer.cross_attention.key.weight.grad is not None


def test_memory_for_another_layer_count_is_rejected() -> None:
    q = build(seed=19)
    memory = build(seed=19, num_layers=2).new_memory(MemorySpec(4))
    x = frames(1, seed=20)[0]
    with pytest.raises(ValueError, match=re.escape('memory has 2 query banks for 3 layers')):
        q.step(x, 0.0, memory)
    assert len(memory) == 0
    assert memory.frames_seen == 0
    with pytest.raises(ValueError, match='memory has 4 query banks for 3 layers'):
        q.step(x, 0.0, StreamMemory(4, MemorySpec(4)))


def test_new_memory_layout() -> None:
    q = build(seed=21)
    memory = q.new_memory(MemorySpec(6))
    assert memory.spec.capacity == 6
    assert len(memory.queries) == 3
    # 4 heads of 8 channels; the values' last 4 are the decays.
    assert memory.visual.fields == {'cross0.k': 32, 'cross0.v': 32, 'cross2.k': 32,
                                    'cross2.v': 32}
    assert memory.visual.decay_fields == {'cross0.v': 4, 'cross2.v': 4}
    assert q.layers[0].cross_attention.value.out_features == 16
    assert q.layers[0].cross_attention.decay_out is None
    # Extra: each with 8 more: zeros after the keys, decays after the values.
    extra = build(seed=21, value_decays=8, decay_channels='extra').new_memory(MemorySpec(6))
    assert extra.visual.fields == {'cross0.k': 64, 'cross0.v': 64, 'cross2.k': 64,
                                   'cross2.v': 64}
    assert extra.visual.decay_fields == {'cross0.v': 4, 'cross2.v': 4}
    # The query banks' self-attention reads no decays.
    assert all(bank.fields == {'self.k': 32, 'self.v': 32} for bank in memory.queries)
    assert memory.query_bank.decay_fields == {}
    # Without cached projections the visual bank still carries the decays, in a field of
    # their own (bank state, not a cache).
    bare = q.new_memory(MemorySpec(None, cache_projections=False))
    assert bare.visual.fields == {'decay': 4} and bare.spec.capacity is None
    assert bare.query_bank.fields == {}
    no_decays = build(seed=21, value_decays=0).new_memory(MemorySpec(6))
    assert no_decays.visual.fields == {'cross0.k': 32, 'cross0.v': 32, 'cross2.k': 32,
                                       'cross2.v': 32}
    assert no_decays.visual.decay_fields == {}


def test_blip2_preset_geometry() -> None:
    config = model_preset('blip2')
    q = MemoryQFormer(config)
    assert len(q.layers) == 12
    cross = [i for i, layer in enumerate(q.layers) if layer.cross_attention is not None]
    assert cross == [0, 2, 4, 6, 8, 10]
    assert q.layers[0].cross_attention.key.weight.shape == (768, 1408)
    assert q.layers[1].self_attention.key.weight.shape == (768, 768)
    assert q.layers[0].feed_forward.dense_in.weight.shape == (3072, 768)
    assert q.query_tokens.shape == (1, 32, 768)


def test_without_query_memory_self_attention_sees_only_the_current_queries() -> None:
    q = build(seed=4)
    xs, times = frames(6, seed=5), irregular_times(6, seed=6)
    with torch.no_grad():
        full = q.new_memory(MemorySpec(3))
        visual_only = q.new_memory(MemorySpec(3, query_memory=False))
        for i in range(6):
            out_full = q.step(xs[i], times[i], full)
            out_visual = q.step(xs[i], times[i], visual_only)
            assert len(visual_only.query_bank) == 0
            assert len(visual_only) == len(full) == min(i + 1, 3)
        # The first step has no query history either way; later ones differ.
        assert not torch.allclose(out_full, out_visual)
        # Equivalent: a fresh query bank every step with the same visual bank.
        fresh_visual = q.new_memory(MemorySpec(3))
        for i in range(6):
            fresh_visual.query_bank.reset()
            expected = q.step(xs[i], times[i], fresh_visual)
        torch.testing.assert_close(out_visual, expected, rtol=0, atol=1e-12)
