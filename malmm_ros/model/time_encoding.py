"""Relative-time attention bias: how MA-LMM's memory knows when a slot happened.

The public MA-LMM code adds a learned embedding of the absolute frame index (capped at 120 frames,
so longer streams crash). We instead bias attention by each stored slot's age relative to now,
computed from its count-weighted mean timestamp, looked up in log-spaced buckets with one learned
value per head (in the spirit of T5's relative position buckets). Why this choice:

- stationary: frame 100,000 sees the same ages as frame 100, so behaviour does not drift;
- exact with cached projections: the bias touches attention logits only, never keys or values,
  so the cached key/value projections of stored frames stay valid as slots age;
- cheap: one table lookup per stored token position per step;
- in seconds, not frames, so a model trained at one sampling rate degrades gracefully at another.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ['RelativeTimeBias', 'age_buckets']


def age_buckets(ages_s: torch.Tensor, num_buckets: int, max_age_s: float) -> torch.Tensor:
    """Bucket index of each age: 0 for the current frame (age <= 0), then log-spaced up to max.

    ages_s: any shape, seconds. Returns int64 of the same shape in [0, num_buckets - 1].
    """
    log_scale = (num_buckets - 2) / math.log1p(max_age_s)
    # Cap the log age before scaling: with 2 buckets log_scale is 0 and 0 * inf would be NaN.
    log_age = torch.log1p(ages_s.clamp(min=0).double()).clamp(max=2 * math.log1p(max_age_s))
    scaled = log_age * log_scale
    past = 1 + scaled.floor().clamp(max=num_buckets - 2).long()
    return torch.where(ages_s > 0, past, torch.zeros_like(past))


class RelativeTimeBias(nn.Module):
    """Learned additive attention bias per head and age bucket (zero at init: no preference)."""

    def __init__(self, num_heads: int, num_buckets: int, max_age_s: float) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_age_s = max_age_s
        self.table = nn.Parameter(torch.zeros(num_buckets, num_heads))

    def forward(self, ages_s: torch.Tensor) -> torch.Tensor:
        """ages_s [B, S] -> bias [B, heads, 1, S], broadcast over the queries."""
        return self.from_buckets(age_buckets(ages_s, self.num_buckets, self.max_age_s))

    def from_buckets(self, buckets: torch.Tensor) -> torch.Tensor:
        """Precomputed buckets [B, S] -> bias [B, heads, 1, S] (buckets shared across layers)."""
        return self.table[buckets].permute(0, 2, 1).unsqueeze(2)  # (B, S, h) -> (B, h, 1, S)
