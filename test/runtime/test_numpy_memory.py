"""The numpy memory of runtime onnx against model/memory.py's banks (the tested reference), in
float64 so that the two agree to rounding over long streams with many merges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from malmm_ros.model.memory import MemoryBank
from malmm_ros.model.time_encoding import age_buckets as torch_age_buckets
from malmm_ros.runtime.numpy_memory import MASKED, NumpyBank, age_buckets

POSITIONS, WIDTH, HEADS, PER_HEAD = 5, 6, 2, 4
RATES = (2.0, 0.3, 0.01)  # 1 / tau: a jump of 8 s passes e^16 and rescales the stored decays


def _banks(capacity: int, groups: int, decays: bool) -> tuple[MemoryBank, NumpyBank]:
    rates = RATES if decays else ()
    reference = MemoryBank(capacity, {'k': HEADS * PER_HEAD}, groups=groups,
                           decay_rates=rates or None,
                           decay_fields={'k': HEADS} if decays else None)
    bank = NumpyBank(capacity, POSITIONS, {'tokens': (1, WIDTH), 'k': (HEADS, PER_HEAD)},
                     groups=groups, decay_rates=rates, decay_fields={'k': 0} if decays else {},
                     dtype=np.float64)
    return reference, bank


def _times(count: int, rng: np.random.Generator) -> list[float]:
    """Irregular stamps with jitter back in time and one long jump (decays rescale)."""
    times, now = [], 0.0
    for index in range(count):
        now += float(rng.choice([0.5, 1.0, 2.5, -0.2])) + (9.0 if index == count // 2 else 0.0)
        times.append(now)
    return times


def _feed(reference: MemoryBank, bank: NumpyBank, time_s: float, tokens: np.ndarray,
          values: np.ndarray) -> None:
    """One frame into both: tokens [G, P, C], values [G, P, H, w] (without decays)."""
    groups = tokens.shape[0]
    reference.open_slot(time_s, torch.from_numpy(tokens[:1]))
    reference.write('tokens', torch.from_numpy(tokens))
    reference.write('k', torch.from_numpy(values.reshape(groups, POSITIONS, -1)))
    bank.open_slot(time_s)
    bank.write('tokens', tokens[:, None])
    rows = values.transpose(0, 2, 1, 3)  # (G, H, P, w)
    if bank.num_decays:
        fresh = np.broadcast_to(bank.fresh, (*rows.shape[:3], bank.num_decays))
        rows = np.concatenate([rows, fresh], axis=-1)
    bank.write('k', rows)
    reference.commit()
    bank.commit()


def _in_order(bank: NumpyBank, name: str) -> np.ndarray:
    """Field `name` oldest first: [G, T, P, H * W] (the reference's `ordered` layout)."""
    array = bank.data[name]  # (G, H, S, P, W)
    groups = np.arange(bank.groups).reshape(-1, 1, 1)
    positions = np.arange(bank.positions).reshape(1, 1, -1)
    order = bank.order[:, :bank.length]  # (G, T, P)
    picked = array.transpose(0, 2, 3, 1, 4)[groups, order, positions]  # (G, T, P, H, W)
    return picked.reshape(*picked.shape[:3], -1)


def _ordered_times(bank: NumpyBank) -> np.ndarray:
    return np.take_along_axis(bank.times, bank.order[:, :bank.length], axis=1)


@pytest.mark.parametrize('capacity', [1, 3, 6])
@pytest.mark.parametrize('groups', [1, 3])
@pytest.mark.parametrize('decays', [False, True])
def test_matches_the_reference_bank_frame_by_frame(capacity: int, groups: int,
                                                   decays: bool) -> None:
    rng = np.random.default_rng(capacity * 10 + groups)
    reference, bank = _banks(capacity, groups, decays)
    for time_s in _times(40, rng):
        tokens = rng.standard_normal((groups, POSITIONS, WIDTH))
        values = rng.standard_normal((groups, POSITIONS, HEADS, PER_HEAD - len(RATES) * decays))
        _feed(reference, bank, time_s, tokens, values)
        assert len(bank) == len(reference) and bank.compressions == reference.compressions
        np.testing.assert_allclose(_in_order(bank, 'tokens'),
                                   reference.tokens.numpy(), atol=1e-12)
        assert (bank.counts.sum(axis=1) == bank.frames_seen).all()  # every frame counted once
        np.testing.assert_array_equal(np.take_along_axis(bank.counts, bank.order[:, :len(bank)],
                                                         1), reference.counts.numpy())
        np.testing.assert_allclose(_ordered_times(bank), reference.times.numpy(), atol=1e-12)
        np.testing.assert_allclose(_in_order(bank, 'k'),
                                   reference.ordered('k').numpy(), atol=1e-12)
        if decays:
            np.testing.assert_allclose(bank.scale, reference.decay_scale().numpy(), rtol=1e-12)
    assert bank.frames_seen == 40
    assert bank.compressions == 40 - capacity


def test_attention_inputs_match_the_reference() -> None:
    """Buckets from the ages, places from the order (0 newest .. 1 the oldest of a full bank),
    masks on empty slots and, when asked, the newest one."""
    rng = np.random.default_rng(7)
    reference, bank = _banks(4, 2, False)
    times = _times(9, rng)
    for index, time_s in enumerate(times):
        tokens = rng.standard_normal((2, POSITIONS, WIDTH))
        values = rng.standard_normal((2, POSITIONS, HEADS, PER_HEAD))
        if index < len(times) - 1:
            _feed(reference, bank, time_s, tokens, values)
    # The last frame: open it in both, then read what the attention would.
    now = times[-1]
    reference.open_slot(now, torch.from_numpy(tokens[:1]))
    bank.open_slot(now)
    buckets, places, mask = bank.attention_inputs(now, 16, 600.0, mask_newest=True)
    used = reference.ages(now).shape[1] * POSITIONS
    want_buckets = torch_age_buckets(reference.ages(now).flatten(1), 16, 600.0).numpy()
    np.testing.assert_array_equal(buckets[:, :used], want_buckets)
    want_places = reference.order_places(torch.float32).numpy()[..., 0]
    np.testing.assert_array_equal(places[:, :used], want_places)
    newest = np.zeros_like(mask, dtype=bool).reshape(2, -1, POSITIONS)
    newest[np.arange(2)[:, None], bank.newest, np.arange(POSITIONS)[None]] = True
    assert (mask.reshape(newest.shape)[newest] == MASKED).all()
    assert (mask.reshape(newest.shape)[~newest] == 0).all()  # full bank: every other row read
    _, _, unmasked = bank.attention_inputs(now, 16, 600.0, mask_newest=False)
    assert (unmasked == 0).all()


def test_empty_slots_are_masked_until_the_bank_fills() -> None:
    bank = NumpyBank(4, 3, {'tokens': (1, 2)})
    bank.open_slot(0.0)
    bank.write('tokens', np.ones((1, 1, 3, 2)))
    bank.commit()
    bank.open_slot(1.0)
    _, places, mask = bank.attention_inputs(1.0, 16, 600.0, mask_newest=False)
    rows = mask.reshape(5, 3)
    assert (rows[:2] == 0).all() and (rows[2:] == MASKED).all()
    np.testing.assert_allclose(places.reshape(5, 3)[:2], [[1 / 3] * 3, [0.0] * 3])


def test_age_buckets_match_the_torch_function() -> None:
    ages = np.array([-1.0, 0.0, 1e-9, 0.4, 1.0, 7.3, 59.9, 600.0, 1e5, 1e12, np.nan])
    for buckets, max_age in ((16, 600.0), (2, 10.0), (40, 3600.0)):
        np.testing.assert_array_equal(
            age_buckets(ages, buckets, max_age),
            torch_age_buckets(torch.from_numpy(ages), buckets, max_age).numpy())


@pytest.mark.parametrize(('kwargs', 'message'), [
    ({'capacity': 0}, 'capacity'),
    ({'fields': {'k': (2, 4)}}, "'tokens'"),
    ({'fields': {'tokens': (2, 4)}}, "'tokens'"),
    ({'decay_rates': (1.0, 2.0, 3.0), 'decay_fields': {'k': 0}}, 'cannot hold'),
    ({'decay_rates': (1.0,), 'decay_fields': {'k': 2}}, 'cannot hold'),
])
def test_refuses_impossible_layouts(kwargs: dict, message: str) -> None:
    arguments = {'capacity': 3, 'positions': 2, 'fields': {'tokens': (1, 4), 'k': (2, 2)},
                 **kwargs}
    with pytest.raises(ValueError, match=message):
        NumpyBank(**arguments)


def test_reset_forgets_everything() -> None:
    rng = np.random.default_rng(3)
    reference, bank = _banks(2, 1, True)
    for time_s in (0.0, 1.0, 2.0, 3.0):
        _feed(reference, bank, time_s, rng.standard_normal((1, POSITIONS, WIDTH)),
              rng.standard_normal((1, POSITIONS, HEADS, PER_HEAD - len(RATES))))
    bank.reset()
    assert len(bank) == 0 and bank.frames_seen == 0 and bank.compressions == 0
    assert (bank.counts == 0).all() and (bank.scale == 1).all()
    _, _, mask = bank.attention_inputs(0.0, 16, 600.0, mask_newest=False)
    assert (mask == MASKED).all()
