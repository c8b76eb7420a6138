"""The trainable MA-LMM model: visual adapter, memory-augmented Q-Former and heads.

The image encoder is frozen and lives outside (malmm_ros.model.encoder, or a compiled backend);
this module starts from its tokens, [B, 49, 1280] for EfficientNet-Lite0.
"""

from __future__ import annotations

import torch
from torch import nn

from malmm_ros.config import ModelConfig
from malmm_ros.labels import LabelMaps
from malmm_ros.model.encoder import FEATURE_DIM, NUM_TOKENS
from malmm_ros.model.heads import AnticipationHeads, HeadLogits
from malmm_ros.model.memory import MemorySpec, StreamMemory
from malmm_ros.model.qformer import MemoryQFormer

__all__ = ['MalmmModel', 'VisualAdapter']


class VisualAdapter(nn.Module):
    """Encoder tokens [B, P, F] -> cross-attention inputs [B, P, encoder_width].

    LayerNorm (as BLIP-2's ln_vision), a linear projection to the Q-Former's encoder width and a
    learned embedding of each token's place in the 7x7 grid. It carries no time: that is the
    attention's relative-time bias, so stored tokens never need updating as they age.
    """

    def __init__(self, feature_dim: int, num_tokens: int, encoder_width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim)
        self.proj = nn.Linear(feature_dim, encoder_width)
        self.position = nn.Parameter(torch.zeros(1, num_tokens, encoder_width))
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(tokens)) + self.position


class MalmmModel(nn.Module):
    """Adapter + memory-augmented Q-Former + heads; one `step` per sampled frame."""

    def __init__(
        self,
        config: ModelConfig,
        labels: LabelMaps,
        *,
        feature_dim: int = FEATURE_DIM,
        num_tokens: int = NUM_TOKENS,
    ) -> None:
        super().__init__()
        self.config = config
        self.labels = labels
        self.feature_dim = feature_dim
        self.num_tokens = num_tokens
        self.adapter = VisualAdapter(feature_dim, num_tokens, config.encoder_width)
        self.qformer = MemoryQFormer(config)
        self.heads = AnticipationHeads(
            config.hidden_size, labels.num_verbs, labels.num_nouns, labels.num_actions
        )

    def new_memory(self, spec: MemorySpec) -> StreamMemory:
        """An empty memory for one stream (see MemoryQFormer.new_memory)."""
        return self.qformer.new_memory(spec)

    def step(self, tokens: torch.Tensor, now_s: float, memory: StreamMemory) -> torch.Tensor:
        """Encoder tokens [B, P, F] of the frame at now_s -> query outputs [B, Q, D]."""
        return self.qformer.step(self.adapter(tokens), now_s, memory)

    def classify(self, queries: torch.Tensor) -> HeadLogits:
        """Query outputs [B, Q, D] -> verb, noun and action logits."""
        return self.heads(queries)
