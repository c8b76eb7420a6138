"""The memory-augmented Q-Former of MA-LMM, one frame per step.

BERT-style post-norm blocks over a fixed set of learned queries:
- self-attention: keys/values = [this layer's query bank ; current queries];
- cross-attention (every `cross_attention_every` layers): keys/values = [visual bank ; current
  frame tokens];
- feed-forward.
Memory lives in a `StreamMemory` passed in on every step; no layer keeps state. When the memory
caches projections, each step projects only the current frame and reads stored frames' keys and
values from the banks (merged by compression with the same weights as the tokens: exact).

Classes read leaf to root: attention, feed-forward, block, Q-Former.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from malmm_ros.config import ModelConfig
from malmm_ros.model.memory import Decays, MemoryBank, MemorySpec, StreamMemory
from malmm_ros.model.time_encoding import (
    OrderBias,
    RelativeTimeBias,
    age_buckets,
    age_features,
    decay_rates,
)

__all__ = ['BankLayout', 'FeedForward', 'MemoryAttention', 'MemoryQFormer', 'QFormerLayer']

# The value decays (model.value_decays) ride with the visual bank's tokens, read by
# cross-attention. The query banks' self-attention goes without: SELF_ATTENTION_DECAYS.
SELF_ATTENTION_DECAYS = False


@dataclass
class BankLayout:
    """What the attention layers reading one bank keep in it: cached fields (name -> width),
    and whether and where the decays live (field -> heads)."""

    fields: dict[str, int] = field(default_factory=dict)
    decay_fields: dict[str, int] = field(default_factory=dict)

    def decays(self, rates: tuple[float, ...]) -> Decays | None:
        return Decays(rates, self.decay_fields) if self.decay_fields and rates else None


class MemoryAttention(nn.Module):
    """Multi-head attention of the queries over [bank ; current], then residual and LayerNorm.

    `cache_key` names this layer's cached projections inside the bank it reads.
    """

    def __init__(self, config: ModelConfig, kv_width: int, cache_key: str,
                 decays: bool = False) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_heads
        self.cache_key = cache_key
        # Value decays (time_encoding.py): 'shared' makes them the last F of each head's value
        # channels, so the value projection gives F fewer per head and the output projection
        # reads them as it reads the rest; 'extra' adds F channels after each head's (keys and
        # queries get F zeros to match) and a projection of their own, decay_out.
        self.num_decays = config.value_decays if decays else 0
        self.extra_decays = bool(self.num_decays) and config.decay_channels == 'extra'
        value_width = width - (0 if self.extra_decays else config.num_heads * self.num_decays)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, value_width)
        self.output = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.time_bias = RelativeTimeBias(config.num_heads, config.time_buckets, config.max_age_s)
        # Age code -> [key shift ; value shift], one matmul (time_encoding.py).
        self.age = (nn.Linear(config.time_features, width + value_width, bias=False)
                    if config.time_features else None)
        self.order_bias = OrderBias(config.num_heads) if config.order_bias else None
        self.decay_out = (nn.Linear(config.num_heads * self.num_decays, width, bias=False)
                          if self.extra_decays else None)
        self._cached_weights: tuple | None = None  # _weights() while inferring

    def forward(self, hidden: torch.Tensor, current: torch.Tensor, bank: MemoryBank,
                buckets: torch.Tensor, ages: torch.Tensor | None,
                places: torch.Tensor | None, group: int | None = None) -> torch.Tensor:
        """hidden [B, Q, D] attends over the bank, whose newest frame is `current` [B, N, C].

        The caller has already put `current` into the bank (open_slot/write); this writes the
        frame's key/value projections into the bank's cache (when it has one) and reads every
        stored frame's from there, so stored frames are never projected again. `buckets`
        [B, S*N] are the age buckets of the bank's slots, `ages` [B, S*N, F] their age code and
        `places` [B, S*N, 1] their places in the temporal order (all computed once per bank and
        step); the age and order terms are added here, never cached. With decays (the
        cross-attention), each head's values carry the tokens' decays after its channels, so
        the head returns their attention-weighted mean beside its context.
        """
        batch, num_q, width = hidden.shape
        heads, head_dim = self.num_heads, width // self.num_heads
        # Extra decays: keys get F zeros after each head's channels, values the decays.
        per_head = head_dim + self.num_decays if self.extra_decays else head_dim
        key_name, value_name = f'{self.cache_key}.k', f'{self.cache_key}.v'
        query_proj, key_proj, output_proj = self._weights()  # (weight, bias) each
        cached = bank.has(key_name)
        from_cache = cached and not torch.is_grad_enabled()
        if cached:
            key_now = F.linear(current, *key_proj)  # (B, N, heads * per_head)
            value_now = self.value(current)  # (B, N, D)
            bank.write(key_name, key_now, group)
            bank.write(value_name, value_now, group)  # the bank keeps the decays beside it
        if from_cache:
            # The bank keeps both as the attention reads them; values carry each token's
            # decays after each head's channels, aged in place by the bank.
            k = bank.view(key_name, group).reshape(batch, -1, heads, per_head)
            v = bank.view(value_name, group).reshape(batch, -1, heads, per_head)
        else:
            # Project every stored frame: the public code's way, and the training path, where
            # the key/value weights need gradients through all slots (the cache is detached).
            # place_newest builds a new tensor, so later in-place merges cannot corrupt what
            # autograd saved, and puts the live current frame in.
            tokens = bank.place_newest(bank.view('tokens', group), current, group)
            k = F.linear(tokens, *key_proj).reshape(batch, -1, heads, per_head)
            v = self.value(tokens).reshape(batch, -1, heads, per_head - self.num_decays)
            if self.num_decays:
                decays = bank.decays(group).reshape(batch, -1, 1, self.num_decays)
                v = torch.cat([v, decays.to(v.dtype).expand(-1, -1, heads, -1)], dim=-1)
        if self.age is not None:
            key_shift, value_shift = self.age(ages).split(
                [width, self.value.out_features], dim=-1)  # (B, S*N, D), (B, S*N, value)
            k = k + self._pad_heads(key_shift, self.extra_decays).view_as(k)
            v = v + self._pad_heads(value_shift, bool(self.num_decays)).view_as(v)
        # With extra decays the queries get the zero channels too: one width for all three
        # (the fused attention kernel needs it), and zeros leave every logit as it was.
        q = F.linear(hidden, *query_proj).view(batch, num_q, heads, per_head)
        bias = self.time_bias.from_buckets(buckets, self.order_bias, places)  # (B, h, 1, S*N)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), attn_mask=bias,
                                             scale=head_dim ** -0.5)  # (B, h, Q, per head)
        if self.num_decays and from_cache:
            # The cache holds decays relative to the bank's reference time; every token ages by
            # the same factor, so it applies to the attention-weighted sums as well.
            out[..., -self.num_decays:] *= bank.decay_scale()
        # With decays each head returned its attention-weighted decays after its context (the
        # weights are linear in v); output_proj maps [context_h ; decays_h] per head (extra
        # decays: output and decay_out in one matmul).
        out = out.transpose(1, 2).reshape(batch, num_q, -1)  # (B, Q, heads * per head)
        return self.norm(hidden + F.linear(out, *output_proj))

    def add_fields(self, layout: BankLayout) -> None:
        """Declare this layer's cached key/value fields (and where its decays live) in the
        layout of the bank it reads."""
        width = self.query.out_features + (self.num_heads * self.num_decays
                                           if self.extra_decays else 0)
        layout.fields.update({f'{self.cache_key}.k': width, f'{self.cache_key}.v': width})
        if self.num_decays:
            layout.decay_fields[f'{self.cache_key}.v'] = self.num_heads

    def _weights(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """(weight, bias) of the query and key projections with F zero outputs after each
        head's, and of the output projection over [context_h ; decays_h] per head (output and
        decay_out interleaved), for extra decays; the layers' own otherwise. One matmul each,
        no pad or copy of activations. Kept while the parameters stay the same and autograd
        is off (inference)."""
        params = (self.query.weight, self.query.bias, self.key.weight, self.key.bias,
                  self.output.weight, self.output.bias)
        if self.decay_out is None:
            return (params[0], params[1]), (params[2], params[3]), (params[4], params[5])
        params += (self.decay_out.weight,)
        stamp = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        grad = torch.is_grad_enabled()
        if not grad and self._cached_weights is not None and self._cached_weights[0] == stamp:
            return self._cached_weights[1]
        q_weight, q_bias, k_weight, k_bias, o_weight, o_bias, d_weight = params
        width = o_weight.shape[0]
        weights = ((self._pad_heads(q_weight.T, True).T, self._pad_heads(q_bias, True)),
                   (self._pad_heads(k_weight.T, True).T, self._pad_heads(k_bias, True)),
                   (torch.cat([o_weight.view(width, self.num_heads, -1),
                               d_weight.view(width, self.num_heads, self.num_decays)],
                              dim=-1).view(width, -1), o_bias))
        self._cached_weights = None if grad else (stamp, weights)
        return weights

    def _pad_heads(self, x: torch.Tensor, pad: bool) -> torch.Tensor:
        """[..., heads * c] -> [..., heads * (c + F)]: F zeros after each head's channels (x as
        it is without `pad`)."""
        if not pad:
            return x
        split = x.reshape(*x.shape[:-1], self.num_heads, -1)
        return F.pad(split, (0, self.num_decays)).flatten(-2)


class FeedForward(nn.Module):
    """Dense, GELU, dense, then residual and LayerNorm (BERT's intermediate/output pair)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=1e-12)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden + self.dense_out(F.gelu(self.dense_in(hidden))))


class QFormerLayer(nn.Module):
    """Self-attention over the query bank, optional cross-attention, feed-forward."""

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.self_attention = MemoryAttention(config, config.hidden_size, 'self',
                                              decays=SELF_ATTENTION_DECAYS)
        self.cross_attention = (
            MemoryAttention(config, config.encoder_width, f'cross{index}', decays=True)
            if index in config.cross_attention_layers() else None
        )
        self.feed_forward = FeedForward(config)


class MemoryQFormer(nn.Module):
    """Learned queries read one frame per step, with the stream's memory, into [B, Q, D]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_queries, config.hidden_size))
        nn.init.trunc_normal_(self.query_tokens, std=0.02)
        self.embed_norm = nn.LayerNorm(config.hidden_size, eps=1e-12)
        self.layers = nn.ModuleList(QFormerLayer(config, i) for i in range(config.num_layers))

    def new_memory(self, spec: MemorySpec) -> StreamMemory:
        """An empty memory shaped for this Q-Former."""
        visual, query = BankLayout(), BankLayout()
        for layer in self.layers:
            layer.self_attention.add_fields(query)
            if layer.cross_attention is not None:
                layer.cross_attention.add_fields(visual)
        rates = decay_rates(self.config.value_decays) if self.config.value_decays else ()
        return StreamMemory(self.config.num_layers, spec, visual_fields=visual.fields,
                            query_fields=query.fields,
                            visual_decays=visual.decays(rates), query_decays=query.decays(rates))

    def step(self, visual: torch.Tensor, now_s: float, memory: StreamMemory) -> torch.Tensor:
        """Process one frame: visual tokens [B, N, encoder_width] at time now_s -> [B, Q, D].

        The frame's tokens and each layer's input query states join the memory (detached: no
        backpropagation through time, as in MA-LMM); each bank compresses once if over M.
        The cached projections are read only with autograd off: run inference under
        torch.inference_mode() (the pipeline does), or every stored frame is projected again.
        """
        if len(memory.queries) != len(self.layers):
            raise ValueError(
                f'memory has {len(memory.queries)} query banks for {len(self.layers)} layers'
            )
        batch = visual.shape[0]
        hidden = self.embed_norm(self.query_tokens.expand(batch, -1, -1))  # (B, Q, D)
        visual_bank, query_bank = memory.visual, memory.query_bank
        visual_bank.add_frame(visual, now_s)
        query_bank.open_slot(now_s, hidden)
        # Ages change every step but are shared by every layer reading a bank: bucket once.
        config = self.config
        visual_ages = visual_bank.ages(now_s).flatten(1)  # (B, S*N)
        query_ages = query_bank.ages(now_s).flatten(1)  # (L*B, S*Q)
        visual_buckets = age_buckets(visual_ages, config.time_buckets, config.max_age_s)
        query_buckets = age_buckets(query_ages, config.time_buckets, config.max_age_s)
        code = config.time_features
        visual_code = age_features(visual_ages, code, hidden.dtype) if code else None
        query_code = age_features(query_ages, code, hidden.dtype) if code else None
        visual_places = query_places = None
        if config.order_bias:
            visual_places = visual_bank.order_places(hidden.dtype)  # (B, S*N, 1)
            query_places = query_bank.order_places(hidden.dtype)
        for index, layer in enumerate(self.layers):
            query_bank.write('tokens', hidden, index)
            rows = slice(index * batch, (index + 1) * batch)
            hidden = layer.self_attention(hidden, hidden, query_bank, query_buckets[rows],
                                          None if query_code is None else query_code[rows],
                                          None if query_places is None else query_places[rows],
                                          index)
            if layer.cross_attention is not None:
                hidden = layer.cross_attention(hidden, visual, visual_bank, visual_buckets,
                                               visual_code, visual_places)
            hidden = layer.feed_forward(hidden)
        if memory.spec.query_memory:
            query_bank.commit()
        else:
            query_bank.reset()
        visual_bank.commit()
        memory.frames_seen += 1
        return hidden
