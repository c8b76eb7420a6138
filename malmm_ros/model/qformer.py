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

import torch
import torch.nn.functional as F
from torch import nn

from malmm_ros.config import ModelConfig
from malmm_ros.model.memory import MemoryBank, MemorySpec, StreamMemory
from malmm_ros.model.time_encoding import (
    OrderBias,
    RelativeTimeBias,
    age_buckets,
    age_features,
    order_places,
)

__all__ = ['FeedForward', 'MemoryAttention', 'MemoryQFormer', 'QFormerLayer']


class MemoryAttention(nn.Module):
    """Multi-head attention of the queries over [bank ; current], then residual and LayerNorm.

    `cache_key` names this layer's cached projections inside the bank it reads.
    """

    def __init__(self, config: ModelConfig, kv_width: int, cache_key: str) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_heads
        self.cache_key = cache_key
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)
        self.output = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.time_bias = RelativeTimeBias(config.num_heads, config.time_buckets, config.max_age_s)
        # Age code -> [key shift ; value shift], one matmul (time_encoding.py).
        self.age = (nn.Linear(config.time_features, 2 * width, bias=False)
                    if config.time_features else None)
        self.order_bias = OrderBias(config.num_heads) if config.order_bias else None

    def forward(self, hidden: torch.Tensor, current: torch.Tensor, bank: MemoryBank,
                buckets: torch.Tensor, ages: torch.Tensor | None,
                places: torch.Tensor | None, group: int | None = None) -> torch.Tensor:
        """hidden [B, Q, D] attends over the bank, whose newest frame is `current` [B, N, C].

        The caller has already put `current` into the bank (open_slot/write); this writes the
        frame's key/value projections into the bank's cache (when it has one) and reads every
        stored frame's from there, so stored frames are never projected again. `buckets`
        [B, S*N] are the age buckets of the bank's slots, `ages` [B, S*N, F] their age code and
        `places` [B, S*N] their places in the temporal order (all computed once per bank and
        step); the age and order terms are added here, never cached.
        """
        batch, num_q, width = hidden.shape
        key_name, value_name = f'{self.cache_key}.k', f'{self.cache_key}.v'
        cached = bank.has(key_name)
        if cached:
            key_now, value_now = self.key(current), self.value(current)  # (B, N, D)
            bank.write(key_name, key_now, group)
            bank.write(value_name, value_now, group)
        if cached and not torch.is_grad_enabled():
            keys, values = bank.view(key_name, group), bank.view(value_name, group)  # (B,S,N,D)
        else:
            # Project every stored frame: the public code's way, and the training path, where
            # the key/value weights need gradients through all slots (the cache is detached).
            # place_newest builds a new tensor, so later in-place merges cannot corrupt what
            # autograd saved, and puts the live current frame in.
            tokens = bank.place_newest(bank.view('tokens', group), current, group)
            keys, values = self.key(tokens), self.value(tokens)

        if self.age is not None:
            key_shift, value_shift = self.age(ages).chunk(2, dim=-1)  # (B, S*N, D) each
            keys = keys.reshape(batch, -1, width) + key_shift
            values = values.reshape(batch, -1, width) + value_shift
        head_dim = width // self.num_heads
        q = self.query(hidden).view(batch, num_q, self.num_heads, head_dim).transpose(1, 2)
        k = keys.reshape(batch, -1, self.num_heads, head_dim).transpose(1, 2)  # (B, h, S*N, hd)
        v = values.reshape(batch, -1, self.num_heads, head_dim).transpose(1, 2)
        bias = self.time_bias.from_buckets(buckets).to(q.dtype)  # (B, h, 1, S*N)
        if self.order_bias is not None:
            bias = bias + self.order_bias(places)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, h, Q, hd)
        context = context.transpose(1, 2).reshape(batch, num_q, width)
        return self.norm(hidden + self.output(context))


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
        self.self_attention = MemoryAttention(config, config.hidden_size, 'self')
        self.cross_attention = (
            MemoryAttention(config, config.encoder_width, f'cross{index}')
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
        width = self.config.hidden_size
        visual_fields = {}
        for layer in self.layers:
            if layer.cross_attention is not None:
                name = layer.cross_attention.cache_key
                visual_fields.update({f'{name}.k': width, f'{name}.v': width})
        return StreamMemory(self.config.num_layers, spec, visual_fields=visual_fields,
                            query_fields={'self.k': width, 'self.v': width})

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
            capacity = memory.spec.capacity
            visual_places = order_places(visual_bank.age_ranks().flatten(1), capacity,
                                         hidden.dtype)
            query_places = order_places(query_bank.age_ranks().flatten(1), capacity,
                                        hidden.dtype)
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
