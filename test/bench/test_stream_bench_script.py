"""bench/stream_bench.py's side-by-side timing of the memory's time representations."""

from __future__ import annotations

import torch

from support.bench_scripts import load_bench_script


def test_time_cost_times_every_representation_once_the_bank_is_full() -> None:
    bench = load_bench_script('stream_bench')
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randn(1, 49, 1280, generator=gen) for _ in range(3)]
    cost = bench.time_cost(tokens, capacity=3, steps=5)
    assert list(cost) == list(bench.TIME_VARIANTS)
    assert all(len(times) == 5 and (times > 0).all() for times in cost.values())
    text = bench.time_cost_table(cost, encoder_ms=10.0)
    assert all(name in text for name in bench.TIME_VARIANTS)
    assert bench.time_cost_ratio(cost) > 0
    # The default is the model's default; the last is the model before issue 12.
    assert bench.TIME_VARIANTS[next(iter(bench.TIME_VARIANTS))] == {}
    assert list(bench.TIME_VARIANTS.values())[-1] == {'order_bias': False, 'value_decays': 0}
