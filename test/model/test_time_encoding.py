"""Tests of the relative-time attention bias: log-spaced age buckets and the per-head table."""

from __future__ import annotations

import math

import pytest
import torch

from malmm_ros.model import time_encoding
from malmm_ros.model.time_encoding import (
    AGE_PREFERENCE_SPAN,
    ORDER_PREFERENCE_SPAN,
    OrderBias,
    RelativeTimeBias,
    age_buckets,
    age_features,
    decay_rates,
    order_places,
)

BUCKET_GRIDS = [(2, 1.0), (3, 10.0), (16, 600.0), (32, 3600.0), (8, 1e7)]


def lower_edge(bucket: int, num_buckets: int, max_age_s: float) -> float:
    """Smallest age of past bucket `bucket` (>= 1): the ages (1 + max)^(j / (nb - 2)) - 1 split
    (0, max] into num_buckets - 2 equal steps of log(1 + age); written with powers, not logs."""
    return (1.0 + max_age_s) ** ((bucket - 1) / (num_buckets - 2)) - 1.0


@pytest.mark.parametrize('age', [0.0, -0.0, -1e-9, -1.0, -1e6, float('-inf')])
def test_current_and_future_ages_are_bucket_zero(age: float) -> None:
    assert age_buckets(torch.tensor([age]), 16, 600.0).tolist() == [0]


# Hand-checked with num_buckets=16, max_age_s=600: scale = 14 / log1p(600) = 14 / 6.398595
# = 2.187981; bucket = 1 + floor(log1p(age) * scale).
HAND_CHECKED = [
    (1e-6, 1),  # log1p = 1e-6 -> 2.2e-6 -> floor 0
    (0.5, 1),  # log1p = 0.405465 -> 0.887 -> floor 0
    (0.6, 2),  # log1p = 0.470004 -> 1.028 -> floor 1
    (1.0, 2),  # log1p = 0.693147 -> 1.517 -> floor 1
    (10.0, 6),  # log1p = 2.397895 -> 5.247 -> floor 5
    (60.0, 9),  # log1p = 4.110874 -> 8.995 -> floor 8
    (61.0, 10),  # log1p = 4.127134 -> 9.030 -> floor 9
    (300.0, 13),  # log1p = 5.707110 -> 12.487 -> floor 12
    (599.0, 14),  # log1p = 6.396930 -> 13.996 -> floor 13
]


@pytest.mark.parametrize(('age', 'bucket'), HAND_CHECKED)
def test_hand_checked_buckets(age: float, bucket: int) -> None:
    assert age_buckets(torch.tensor([age], dtype=torch.float64), 16, 600.0).item() == bucket


def test_hand_checked_table_matches_log1p_arithmetic() -> None:
    # Guards the table above against typos: recompute each row from math.log1p.
    scale = 14 / math.log1p(600.0)
    for age, bucket in HAND_CHECKED:
        assert 1 + math.floor(math.log1p(age) * scale) == bucket


@pytest.mark.parametrize(('num_buckets', 'max_age_s'), BUCKET_GRIDS)
def test_positive_ages_map_to_past_buckets_monotonically(num_buckets: int,
                                                         max_age_s: float) -> None:
    ages = torch.logspace(-9, 9, 20001, dtype=torch.float64)
    buckets = age_buckets(ages, num_buckets, max_age_s)
    assert buckets.dtype == torch.int64
    assert buckets.min().item() == 1
    assert buckets.max().item() == num_buckets - 1
    assert (buckets[1:] >= buckets[:-1]).all()
    # Every bucket is used somewhere over such a wide range of ages.
    assert set(buckets.tolist()) == set(range(1, num_buckets))


@pytest.mark.parametrize(('num_buckets', 'max_age_s'), BUCKET_GRIDS)
def test_ages_beyond_max_share_the_last_bucket(num_buckets: int, max_age_s: float) -> None:
    ages = torch.tensor([max_age_s * 1.001, max_age_s * 2, max_age_s * 1e3, 1e12, 1e300],
                        dtype=torch.float64)
    assert age_buckets(ages, num_buckets, max_age_s).tolist() == [num_buckets - 1] * 5


def test_infinite_age_lands_in_last_bucket() -> None:
    ages = torch.tensor([float('inf'), 1.0])
    assert age_buckets(ages, 16, 600.0).tolist() == [15, 2]


# Regression: with 2 buckets (log scale 0) an infinite age must not become NaN -> bucket
# INT64_MIN.
def test_infinite_age_with_two_buckets_is_in_range() -> None:
    ages = torch.tensor([float('inf'), 1.0, 0.0])
    assert age_buckets(ages, 2, 600.0).tolist() == [1, 1, 0]


@pytest.mark.parametrize(('num_buckets', 'max_age_s'), [g for g in BUCKET_GRIDS if g[0] > 2])
def test_bucket_edges_are_log_spaced(num_buckets: int, max_age_s: float) -> None:
    for bucket in range(2, num_buckets - 1):
        edge = lower_edge(bucket, num_buckets, max_age_s)
        ages = torch.tensor([edge * (1 - 1e-9), edge * (1 + 1e-9)], dtype=torch.float64)
        assert age_buckets(ages, num_buckets, max_age_s).tolist() == [bucket - 1, bucket]


def test_keeps_shape_and_accepts_other_dtypes() -> None:
    ages = torch.tensor([[[0.0, 0.5], [10.0, 1e6]], [[-3.0, 1.0], [60.0, 61.0]]])
    expected = [[[0, 1], [6, 15]], [[0, 2], [9, 10]]]
    for dtype in (torch.float32, torch.float64):
        buckets = age_buckets(ages.to(dtype), 16, 600.0)
        assert buckets.shape == ages.shape
        assert buckets.tolist() == expected
    integer = age_buckets(torch.tensor([-5, 0, 1, 10, 10_000]), 16, 600.0)
    assert integer.tolist() == [0, 0, 2, 6, 15]


def test_relative_time_bias_starts_as_a_spread_of_age_preferences() -> None:
    """Head 0 prefers the newest slots, the last head the oldest, the rest in between; no
    preference for the current frame (bucket 0) and none at all with a single head."""
    bias = RelativeTimeBias(4, 16, 600.0)
    out = bias(torch.tensor([[0.0, 1.0, 30.0, 1e9]]))[0, :, 0]  # (heads, slots)
    assert torch.equal(out[:, 0], torch.zeros(4))
    span = AGE_PREFERENCE_SPAN
    torch.testing.assert_close(out[:, 3], torch.tensor([-span, -span / 3, span / 3, span]))
    assert (out[0, 1:] < 0).all() and (out[-1, 1:] > 0).all()
    assert (out[0].diff() <= 0).all() and (out[-1].diff() >= 0).all()  # monotonic in age
    assert torch.equal(RelativeTimeBias(1, 16, 600.0).table, torch.zeros(16, 1))


@pytest.mark.parametrize(('batch', 'heads'), [(1, 1), (2, 3), (3, 8)])
def test_relative_time_bias_picks_table_rows_by_bucket(batch: int, heads: int) -> None:
    module = RelativeTimeBias(heads, 16, 600.0)
    with torch.no_grad():  # row j, column h holds 100 j + h
        module.table.copy_(100.0 * torch.arange(16.0)[:, None] + torch.arange(float(heads)))
    ages = torch.tensor([0.0, -2.0, 0.5, 1.0, 10.0, 60.0, 61.0, 599.0, 1e6])
    buckets = [0, 0, 1, 2, 6, 9, 10, 14, 15]
    ages = torch.stack([ages.roll(b) for b in range(batch)])  # different order per batch row
    out = module(ages)
    assert out.shape == (batch, heads, 1, ages.shape[1])
    for b in range(batch):
        row_buckets = [buckets[(s - b) % len(buckets)] for s in range(ages.shape[1])]
        for h in range(heads):
            assert out[b, h, 0].tolist() == [100.0 * j + h for j in row_buckets]


def test_relative_time_bias_gradient_counts_bucket_hits() -> None:
    module = RelativeTimeBias(2, 16, 600.0)
    ages = torch.tensor([[0.0, 0.5, 0.5, 10.0], [1e6, 10.0, 0.0, 0.0]])
    module(ages).sum().backward()
    expected = torch.zeros(16, 2)
    for bucket, hits in {0: 3, 1: 2, 6: 2, 15: 1}.items():
        expected[bucket] = hits
    assert torch.equal(module.table.grad, expected)


# -- the age code ------------------------------------------------------------------------------


def test_age_code_shape_range_and_current_frame() -> None:
    ages = torch.tensor([[0.0, -0.5, 1.0, 600.0, 1e5]])
    code = age_features(ages, 16)
    assert code.shape == (1, 5, 16) and code.dtype == torch.float64
    assert code.abs().max() <= 1.0
    expected_now = torch.cat([torch.ones(8), torch.zeros(4), torch.ones(4)]).double()
    torch.testing.assert_close(code[0, 0], expected_now)
    torch.testing.assert_close(code[0, 1], expected_now)  # jitter below 0 is "now"


def test_age_code_decays_fall_with_age() -> None:
    """Which of two slots is older is a linear read-out: every decay falls monotonically."""
    code = age_features(torch.tensor([0.0, 0.4, 3.0, 40.0, 500.0, 5000.0]), 16)
    decays = code[:, :8]
    assert (decays[1:] <= decays[:-1]).all() and (decays[:-1] - decays[1:]).sum(1).min() > 0


def test_age_code_tells_nearby_ages_apart_at_every_scale() -> None:
    """Two ages 1 s apart differ clearly, for recent and for old slots (order is readable)."""
    for base in (0.0, 5.0, 30.0, 300.0, 1200.0):
        a, b = age_features(torch.tensor([base, base + 1.0]), 16)
        assert (a - b).norm() > 0.1, base


def test_age_code_depends_on_age_only() -> None:
    """Stationary: the same age gives the same code, whatever the absolute time."""
    ages = torch.tensor([3.0, 17.5, 250.0])
    torch.testing.assert_close(age_features(ages, 16),
                               age_features((ages + 1e5) - 1e5, 16))


def test_age_code_first_built_under_inference_mode_still_serves_training() -> None:
    """The rates are cached on first use; a node's first step runs under inference mode, and a
    later training step (autograd on) must still be able to use them."""
    time_encoding._rates.cache_clear()  # noqa: SLF001 (the cache under test)
    with torch.inference_mode():
        age_features(torch.tensor([1.0]), 12)
    weight = torch.ones(12, dtype=torch.float64, requires_grad=True)
    (age_features(torch.tensor([2.0, 30.0]), 12) * weight).sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


# -- order bias -------------------------------------------------------------------------------


def test_order_places_scale_by_capacity_not_by_fill() -> None:
    ranks = torch.tensor([[0, 1, 2]])
    torch.testing.assert_close(order_places(ranks, 5, torch.float64),
                               torch.tensor([[0.0, 0.25, 0.5]], dtype=torch.float64))
    # No capacity (the uncompressed baseline): its own length; capacity 1: only the current.
    torch.testing.assert_close(order_places(ranks, None, torch.float32),
                               torch.tensor([[0.0, 0.5, 1.0]]))
    assert torch.equal(order_places(torch.tensor([[0, 1]]), 1, torch.float32),
                       torch.tensor([[0.0, 1.0]]))


def test_order_bias_starts_as_a_spread_of_order_preferences() -> None:
    """Slopes evenly spaced from -span (newest preferred) to +span (oldest); the current frame
    (place 0) gets no bias; a single head has no preference."""
    bias = OrderBias(4)
    places = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.0, 0.25]])
    out = bias(places)
    assert out.shape == (2, 4, 1, 3)
    span = ORDER_PREFERENCE_SPAN
    slopes = torch.tensor([-span, -span / 3, span / 3, span])
    torch.testing.assert_close(out[0, :, 0, 2], slopes)
    torch.testing.assert_close(out[1, :, 0], slopes[:, None] * places[1])
    assert torch.equal(out[0, :, 0, 0], torch.zeros(4))
    assert torch.equal(OrderBias(1).slope, torch.zeros(1))


def test_order_bias_tells_two_old_neighbours_apart_where_age_buckets_do_not() -> None:
    """Why it exists: two events 12 s apart 40-52 s ago share one log-spaced age bucket, so the
    bucket bias weights them alike; their places in a bank of 20 differ, and so do the biases."""
    ages = torch.tensor([[40.0, 52.0]])
    buckets = age_buckets(ages, 16, 600.0)
    assert buckets[0, 0] == buckets[0, 1]
    places = order_places(torch.tensor([[13, 17]]), 20, torch.float32)
    out = OrderBias(2)(places)[0, :, 0]  # (heads, 2)
    assert out[1, 1] - out[1, 0] > 0.5 and out[0, 1] - out[0, 0] < -0.5  # x 1.6 or more


@pytest.mark.parametrize('count', [2, 3, 8, 16])
def test_decay_rates_span_half_a_second_to_2000_s_geometrically(count: int) -> None:
    taus = [1.0 / rate for rate in decay_rates(count)]
    assert len(taus) == count
    assert taus[0] == pytest.approx(0.5, rel=1e-12) and taus[-1] == pytest.approx(2000.0,
                                                                                  rel=1e-12)
    ratios = [b / a for a, b in zip(taus[:-1], taus[1:], strict=True)]
    assert ratios == pytest.approx([4000.0 ** (1 / (count - 1))] * (count - 1), rel=1e-12)


def test_one_decay_rate_is_the_middle_timescale() -> None:
    assert decay_rates(1) == pytest.approx((1 / math.sqrt(1000.0),), rel=1e-12)


def test_bucket_and_order_biases_fuse_into_one_contiguous_bias() -> None:
    """from_buckets(buckets, order, places) is the two biases added, laid out [B, h, 1, S] with
    the tokens contiguous (the attention kernel copies it over the queries)."""
    gen = torch.Generator().manual_seed(3)
    time_bias, order = RelativeTimeBias(4, 16, 600.0), OrderBias(4)
    with torch.no_grad():
        time_bias.table.normal_(generator=gen)
        order.slope.normal_(generator=gen)
    buckets = torch.randint(0, 16, (2, 30), generator=gen)
    places = torch.rand(2, 30, generator=gen)
    fused = time_bias.from_buckets(buckets, order, places)
    expected = time_bias.table[buckets].permute(0, 2, 1).unsqueeze(2) + order(places)
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-6)
    assert fused.shape == (2, 4, 1, 30) and fused.stride(-1) == 1
    assert torch.equal(time_bias.from_buckets(buckets),
                       time_bias.table[buckets].permute(0, 2, 1).unsqueeze(2))
