"""How MA-LMM's memory knows when a stored token happened: its age, its place in the order and
how far each token has decayed.

The public MA-LMM code adds a learned embedding of the absolute frame index to the stored
features (capped at 120 frames, so longer streams crash). We use relative time instead, read
from the banks on every step (never baked into what is cached):

1. `RelativeTimeBias`: a learned attention-logit bias per head and log-spaced age bucket (in
   the spirit of T5's relative buckets). The age is now minus the token's count-weighted mean
   time (a merged token's age is the mean age of the frames it holds), in seconds, so a model
   trained at one sampling rate degrades gracefully at another. It says how long ago.
2. `OrderBias`: a learned logit slope per head times the token's place in its position's
   temporal order (0 the current frame, 1 the oldest slot of a full bank; `order_places`). It
   says which came first, at any age. Log buckets cannot: two events 12 s apart 40-52 s ago
   share a bucket, and bench/sequence_bench.py's which-came-first task stayed near chance at
   the node's M = 20 with the buckets alone (67 % over three seeds).
3. Value decays (model.value_decays, 8 by default): every token of the visual bank carries
   exp(-age / tau) for taus geometric from 0.5 s to 2,000 s (`decay_rates`). They are the
   last F value channels of each cross-attention head (model.decay_channels: shared; the value
   projection gives F fewer per head), so each head returns the attention-weighted decays of
   what it attended to beside its context, and the output projection reads both. Sharing the
   head's width keeps the attention as cheap as without them; adding F channels after each
   head's (decay_channels: extra, with zero channels on keys and queries and a projection of
   their own, `decay_out`) keeps every value channel, as BLIP-2's weights need, and costs a
   little more (the step with the whole time representation 1.10-1.11x of the one before
   issue 12 against 1.09-1.10x; bench/stream_bench.py). The biases above only
   steer where a head looks; the decays put the
   "when" of what it found into its output, so the read-out can tell "the knife, long ago" from
   "the knife, just now". With the order bias alone the which-first task reached 99 % at
   M = 20 but learned and then overfitted at M = 8 (89 % over three seeds); with the decays
   both are met (docs/PERFORMANCE.md).
   Bank state, not a function of the mean time: a merged token holds the mean decay of its
   frames (MBC merges them like the tokens), which is what its merged value is the mean of.
   The bank stores them in the cached values' layout (model/memory.py), relative to a
   reference time: every token ages by the same factor per timescale, so the attention
   applies exp(-(now - ref) / tau) to its [Q, F] result instead of touching every stored
   token, and the bank rescales them in place only when new frames' values would pass e^16.
   The query banks' self-attention reads no decays (model/qformer.py
   SELF_ATTENTION_DECAYS): the visual bank is where the events are, and each extra
   attention width costs.

The biases start as a spread of preferences (ALiBi-like slopes of both signs): one head leans
to the newest, one to the oldest, the others in between. The start matters. With every head
indifferent to time, "A then B" and "B then A" give the same attention and the same outputs,
so the loss has no gradient towards order and training waits at chance until noise breaks the
tie (measured: the zero start stayed near chance). A head that leans old returns more of
whichever cue is older from the first step, so the read-out has something to learn at once.

4. `age_features` (model.time_features > 0, off by default): a fixed multi-scale code of the
   age (decays and sin/cos pairs), projected by each attention layer into a shift of the
   stored keys and values at attention time. Measured before the value decays: it let the
   bucket bias learn order at M = 4 and 8, not at M = 20, and costs about a third of a step.

All keep what the memory guarantees:
- stationary: frame 100,000 sees the same ages, places and decays as frame 100 (no absolute
  index; the decays depend only on time differences);
- exact with cached projections: the biases are added at attention time and the decays are
  bank state merged like the cached keys/values, so cached and recomputed steps agree;
- cheap: two [heads, S*N] biases per attention and F channels of each cross-attention head
  (bench/stream_bench.py measures the cost side by side).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['AGE_PREFERENCE_SPAN', 'ORDER_PREFERENCE_SPAN', 'OrderBias', 'RelativeTimeBias',
           'age_buckets', 'age_features', 'decay_rates', 'order_places']

# Timescales of the value decays and the age code, geometric from 0.5 s to 2,000 s: sub-second
# order at camera rates up to half an hour of kitchen activity.
MIN_PERIOD_S, MAX_PERIOD_S = 0.5, 2000.0
# Attention-logit range of the initial age preferences, newest to oldest bucket. Measured with
# bench/sequence_bench.py at M = 8, 12 epochs: with 3 one of two seeds ended at 86 %; with 6 that
# seed reached 100 % by epoch 5 and the benchmark's three seeds 95-100 %.
AGE_PREFERENCE_SPAN = 6.0
# Attention-logit range of the initial order preferences, newest to oldest slot of a full bank
# (OrderBias). With 6 the which-first task reached 100 % by epoch 5 at M = 20 on the seed that
# stayed at chance without it, but with the value decays the presence task
# (bench/memory_ablation.py) lost a test stream on one of three seeds; with 4 both hold
# (docs/PERFORMANCE.md).
ORDER_PREFERENCE_SPAN = 4.0


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


def age_features(ages_s: torch.Tensor, num_features: int,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Multi-scale code of ages in seconds: [..., num_features] (a multiple of 4).

    The first half: exp(-age / tau_j), tau_j geometric in [0.5 s, 2,000 s] (1 for the current
    frame, falling monotonically with age at every scale). The second half: (sin, cos) pairs of
    2 pi age / T_j, T_j geometric over the same range. Ages below 0 (clock jitter) count as 0,
    the current frame. In `dtype`: the model's, so no cast follows (float32 keeps ages of a
    long session to a few ms, far finer than the shortest period).
    """
    decays = num_features // 2
    # One multiply by the cached rates [-1/tau ; 2 pi/T], then exp on the first half and
    # sin/cos on the second: few operators, as this runs for every bank on every step.
    phase = ages_s.clamp(min=0).to(dtype).unsqueeze(-1) * _rates(num_features, ages_s.device,
                                                                 dtype)
    turns = phase[..., decays:]
    return torch.cat([phase[..., :decays].exp(), turns.sin(), turns.cos()], dim=-1)


@functools.lru_cache(maxsize=16)
def _rates(num_features: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[-1/tau_j (F/2 decays) ; 2 pi/T_j (F/4 periods)], geometric in [0.5, 2000] s.

    Built outside inference mode, so a first call under torch.inference_mode() does not cache
    an inference tensor that training could not use.
    """
    lo, hi = math.log10(MIN_PERIOD_S), math.log10(MAX_PERIOD_S)
    with torch.inference_mode(False):
        # F/2 >= 2 decays (F is a multiple of 4): the value decays' timescales.
        rates = torch.tensor(decay_rates(num_features // 2), dtype=torch.float64, device=device)
        periods = torch.logspace(lo, hi, num_features // 4, dtype=torch.float64, device=device)
        return torch.cat([-rates, 2 * math.pi / periods]).to(dtype)


def decay_rates(num_decays: int) -> tuple[float, ...]:
    """1 / tau_j for `num_decays` timescales geometric in [0.5 s, 2,000 s] (the banks' decay
    field, `MemoryBank(decay_rates=...)`)."""
    if num_decays == 1:
        return (1.0 / math.sqrt(MIN_PERIOD_S * MAX_PERIOD_S),)
    lo, hi = math.log(MIN_PERIOD_S), math.log(MAX_PERIOD_S)
    return tuple(math.exp(-(lo + (hi - lo) * j / (num_decays - 1))) for j in range(num_decays))


def _spread(num_heads: int, span: float) -> torch.Tensor:
    """Initial per-head slopes, evenly spaced in [-span, +span] (one head: no preference)."""
    return torch.linspace(-span, span, num_heads) if num_heads > 1 else torch.zeros(1)


class RelativeTimeBias(nn.Module):
    """Learned additive attention bias per head and age bucket.

    Initialised as a spread of age preferences (see the module docstring): head h's bias rises
    linearly over the buckets with slope s_h, s evenly spaced in [-AGE_PREFERENCE_SPAN,
    +AGE_PREFERENCE_SPAN] from the head preferring the newest slots to the one preferring the
    oldest (one head: no preference).
    """

    def __init__(self, num_heads: int, num_buckets: int, max_age_s: float) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_age_s = max_age_s
        ramp = torch.linspace(0.0, 1.0, num_buckets).unsqueeze(1)  # (buckets, 1)
        slopes = _spread(num_heads, AGE_PREFERENCE_SPAN)
        self.table = nn.Parameter(ramp * slopes.unsqueeze(0))  # (buckets, heads)

    def forward(self, ages_s: torch.Tensor) -> torch.Tensor:
        """ages_s [B, S] -> bias [B, heads, 1, S], broadcast over the queries."""
        return self.from_buckets(age_buckets(ages_s, self.num_buckets, self.max_age_s))

    def from_buckets(self, buckets: torch.Tensor, order: OrderBias | None = None,
                     places: torch.Tensor | None = None) -> torch.Tensor:
        """Precomputed buckets [B, S] -> bias [B, heads, 1, S] (buckets shared across layers),
        plus `order`'s bias over `places` [B, S] (or [B, S, 1] in the table's dtype, as
        `MemoryBank.order_places` gives them) when given: one lookup and one fused
        multiply-add, as this runs in every attention layer on every step."""
        bias = F.embedding(buckets, self.table)  # (B, S, h)
        if order is not None:
            if places.dim() == 2 or places.dtype != bias.dtype:
                places = places.reshape(*places.shape[:2], 1).to(bias.dtype)
            bias = torch.addcmul(bias, places, order.slope)
        # Tokens contiguous: the attention kernel expands the bias over the queries with a
        # copy, several times slower from a strided bias.
        return bias.transpose(1, 2).contiguous().unsqueeze(2)  # (B, h, 1, S)


def order_places(ranks: torch.Tensor, capacity: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Ranks from `MemoryBank.age_ranks` (0 newest) -> places in [0, 1]: rank / (M - 1).

    Scaled by the capacity M, not by how full the bank is, so a slot's place only grows as it
    ages, and a model trained at one M reads "the oldest of what I hold" the same at another.
    An uncompressed bank (capacity None) scales by its own length.
    """
    span = (capacity if capacity is not None else int(ranks.max()) + 1) - 1
    return ranks.to(dtype) / max(span, 1)


class OrderBias(nn.Module):
    """Learned attention-logit slope per head over each stored token's place in the order.

    bias[h, token] = slope[h] * place(token), place 0 for the current frame and 1 for the
    oldest slot a full bank holds. Initialised as a spread of preferences like
    `RelativeTimeBias`, slopes evenly spaced in [-ORDER_PREFERENCE_SPAN, +ORDER_PREFERENCE_SPAN]
    (one head: none). Unlike the log-spaced age buckets, two events a few seconds apart a
    minute ago still sit in different places, so a head leaning to the old returns more of the
    older one from the first step; the read-out has an order signal to learn from at any M.
    """

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.slope = nn.Parameter(_spread(num_heads, ORDER_PREFERENCE_SPAN))

    def forward(self, places: torch.Tensor) -> torch.Tensor:
        """places [B, S] -> bias [B, heads, 1, S], broadcast over the queries."""
        return self.slope.view(1, -1, 1, 1) * places.unsqueeze(1).unsqueeze(2)
