"""Tests of the memory banks and MBC against an independent loop reference, in float64."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from malmm_ros.errors import ConfigError
from malmm_ros.model.memory import Decays, MemoryBank, MemorySpec, StreamMemory
from malmm_ros.model.time_encoding import order_places
from support.mbc_reference import memory_bank_compress

pytestmark = pytest.mark.usefixtures('single_thread')

TOL = 1e-12
TIE = 1e-12  # similarities this close to the best are ties (rounding noise); the first wins


# -- reference --------------------------------------------------------------------------------


def ref_cosine(u: np.ndarray, v: np.ndarray) -> float:
    """Cosine similarity of two vectors: dot / (|u| |v|), norms floored at 1e-12."""
    dot = float(np.dot(u, v))
    norm_u = max(math.sqrt(float(np.dot(u, u))), 1e-12)
    norm_v = max(math.sqrt(float(np.dot(v, v))), 1e-12)
    return dot / (norm_u * norm_v)


def ref_compress(
    tokens: np.ndarray, counts: np.ndarray, extras: dict[str, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """One MBC step by plain loops over (b, n): tokens [B,T,N,C], counts [B,T,N], extras
    {name: [B,T,N,W]} merged with the same pair and weights. Returns the compressed arrays and
    the chosen pair index k [B,N]. Ties (within TIE, as in exact arithmetic) go to the first."""
    extras = extras or {}
    batch, slots, positions, _ = tokens.shape
    out_tokens = np.zeros((batch, slots - 1, positions, tokens.shape[3]))
    out_counts = np.zeros((batch, slots - 1, positions))
    out_extras = {name: np.zeros((batch, slots - 1, positions, value.shape[3]))
                  for name, value in extras.items()}
    chosen = np.zeros((batch, positions), dtype=np.int64)
    for b in range(batch):
        for n in range(positions):
            sims = [ref_cosine(tokens[b, t, n], tokens[b, t + 1, n]) for t in range(slots - 1)]
            k = next(t for t, sim in enumerate(sims) if sim >= max(sims) - TIE)
            chosen[b, n] = k
            c_k, c_next = float(counts[b, k, n]), float(counts[b, k + 1, n])

            def merge(rows: np.ndarray, k: int = k, c_k: float = c_k,
                      c_next: float = c_next) -> np.ndarray:
                merged = (c_k * rows[k] + c_next * rows[k + 1]) / (c_k + c_next)
                return np.stack([*rows[:k], merged, *rows[k + 2:]])

            out_tokens[b, :, n] = merge(tokens[b, :, n])
            out_counts[b, :, n] = [*counts[b, :k, n], c_k + c_next, *counts[b, k + 2:, n]]
            for name, value in extras.items():
                out_extras[name][b, :, n] = merge(value[b, :, n])
    return out_tokens, out_counts, out_extras, chosen


class RefStream:
    """Reference bank: append a frame, then compress once when it holds more than capacity."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.tokens: np.ndarray | None = None
        self.counts: np.ndarray | None = None
        self.extras: dict[str, np.ndarray] = {}

    def append(self, tokens: np.ndarray, time_s: float,
               fields: dict[str, np.ndarray] | None = None) -> None:
        batch, positions, _ = tokens.shape
        new = {'time': np.full((batch, 1, positions, 1), float(time_s))}
        new.update({name: value[:, None] for name, value in (fields or {}).items()})
        if self.tokens is None:
            self.tokens, self.counts, self.extras = tokens[:, None], np.ones(
                (batch, 1, positions)), new
        else:
            self.tokens = np.concatenate([self.tokens, tokens[:, None]], axis=1)
            self.counts = np.concatenate([self.counts, np.ones((batch, 1, positions))], axis=1)
            self.extras = {name: np.concatenate([self.extras[name], new[name]], axis=1)
                           for name in new}
        if self.capacity is not None and self.tokens.shape[1] > self.capacity:
            self.tokens, self.counts, self.extras, _ = ref_compress(
                self.tokens, self.counts, self.extras)

    @property
    def times(self) -> np.ndarray:
        return self.extras['time'][..., 0]


# -- helpers ----------------------------------------------------------------------------------


def frame_stream(frames: int, batch: int, positions: int, width: int,
                 seed: int) -> torch.Tensor:
    """[frames, B, N, C] float64: a random walk plus noise, so neighbours are often similar."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.randn(frames, batch, positions, width, generator=gen, dtype=torch.float64)
    noise = torch.randn(frames, batch, positions, width, generator=gen, dtype=torch.float64)
    return 0.3 * steps.cumsum(0) + noise


def close(actual: torch.Tensor, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual.numpy(), expected, rtol=0, atol=TOL)


# -- memory_bank_compress ---------------------------------------------------------------------


SHAPES = [(1, 2, 1, 1), (2, 2, 3, 5), (3, 7, 4, 1), (2, 9, 1, 6), (4, 5, 6, 16), (1, 12, 3, 2),
          (2, 3, 2, 3)]


@pytest.mark.parametrize('counts_dtype', [torch.int64, torch.float64])
@pytest.mark.parametrize(('batch', 'slots', 'positions', 'width'), SHAPES)
def test_compress_matches_reference(batch: int, slots: int, positions: int, width: int,
                                    counts_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(slots * 1000 + width)
    bank = torch.randn(batch, slots, positions, width, generator=gen, dtype=torch.float64)
    counts = torch.randint(1, 20, (batch, slots, positions), generator=gen).to(counts_dtype)
    new_bank, new_counts = memory_bank_compress(bank, counts)
    ref_bank, ref_counts, _, _ = ref_compress(bank.numpy(), counts.double().numpy())
    assert new_bank.shape == (batch, slots - 1, positions, width)
    assert new_counts.shape == (batch, slots - 1, positions)
    close(new_bank, ref_bank)
    close(new_counts.double(), ref_counts)
    assert torch.equal(new_counts.sum(1), counts.sum(1))


def test_compress_hand_example() -> None:
    # One position, slots [1,0], [0,1], [0.6,0.8]: cosines 0 and 0.8, so slots 1 and 2 merge
    # with counts 1 and 3: ([0,1] + 3 [0.6,0.8]) / 4 = [0.45, 0.85].
    bank = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.6, 0.8]]]], dtype=torch.float64)
    counts = torch.tensor([[[2], [1], [3]]])
    new_bank, new_counts = memory_bank_compress(bank, counts)
    assert torch.allclose(new_bank, torch.tensor([[[[1.0, 0.0]], [[0.45, 0.85]]]],
                                                 dtype=torch.float64), atol=1e-15, rtol=0)
    assert new_counts.tolist() == [[[2], [4]]]


def test_compress_picks_the_pair_per_position_and_first_on_ties() -> None:
    # Position 0: every slot identical, so every pair ties and the first pair merges.
    # Position 1: only the last pair is similar. Position 2: C=1 sign flips, cosines -1, 1, 1.
    same = torch.tensor([1.0, 2.0])
    pos0 = [same, same, same, same]
    pos1 = [torch.tensor(v) for v in ([1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-1.0, 0.01])]
    pos2 = [torch.tensor(v) for v in ([3.0, 0.0], [-1.0, 0.0], [-2.0, 0.0], [-5.0, 0.0])]
    bank = torch.stack([torch.stack(p) for p in (pos0, pos1, pos2)], dim=1)[None].double()
    counts = torch.tensor([[[1, 1, 1], [2, 1, 1], [3, 1, 1], [4, 1, 1]]])  # (B, T, N)
    new_bank, new_counts = memory_bank_compress(bank, counts)
    assert new_counts[0].T.tolist() == [[3, 3, 4], [1, 1, 2], [1, 2, 1]]
    assert torch.allclose(new_bank[0, 0, 0], same.double(), atol=1e-15, rtol=0)
    assert torch.equal(new_bank[0, :2, 1], bank[0, :2, 1])
    assert new_bank[0, :, 2, 0].tolist() == [3.0, -1.5, -5.0]


@pytest.mark.parametrize(('bank_shape', 'counts_shape', 'message'), [
    ((2, 3, 4), (2, 3, 4), 'bank must be [B,T,N,C] and counts [B,T,N]; got (2, 3, 4)'),
    ((2, 3, 4, 5, 1), (2, 3, 4), 'bank must be [B,T,N,C]'),
    ((2, 3, 4, 5), (2, 3, 5), 'and (2, 3, 5)'),
    ((2, 3, 4, 5), (2, 3, 4, 5), 'counts [B,T,N]'),
    ((2, 1, 4, 5), (2, 1, 4), 'cannot compress a bank of 1 slot(s)'),
    ((2, 0, 4, 5), (2, 0, 4), 'cannot compress a bank of 0 slot(s)'),
])
def test_compress_rejects_bad_shapes(bank_shape: tuple[int, ...], counts_shape: tuple[int, ...],
                                     message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        memory_bank_compress(torch.zeros(bank_shape), torch.ones(counts_shape))


# -- streaming --------------------------------------------------------------------------------


@pytest.mark.parametrize(('batch', 'positions', 'width', 'capacity'), [
    (1, 1, 1, 1), (2, 3, 4, 1), (2, 3, 4, 10), (1, 5, 8, 10), (3, 2, 1, 4), (2, 4, 6, 3),
])
def test_stream_matches_reference(batch: int, positions: int, width: int,
                                  capacity: int) -> None:
    frames = 200
    tokens = frame_stream(frames, batch, positions, width, seed=capacity * 100 + width)
    extra = torch.randn(frames, batch, positions, 3, dtype=torch.float64)
    bank = MemoryBank(capacity, {'x': 3})
    ref = RefStream(capacity)
    for i in range(frames):
        time_s = 0.5 * i + 0.25 * (i % 3)  # irregular spacing
        bank.append(tokens[i], time_s, {'x': extra[i]})
        ref.append(tokens[i].numpy(), time_s, {'x': extra[i].numpy()})
        assert len(bank) == min(i + 1, capacity)
        assert bank.frames_seen == i + 1
        close(bank.tokens, ref.tokens)
        close(bank.counts, ref.counts)
        close(bank.times, ref.times)
        close(bank.ordered('x'), ref.extras['x'])
        assert torch.equal(bank.counts.sum(1), torch.full((batch, positions), i + 1.0))
    assert bank.compressions == frames - capacity


def test_stream_with_ties_merges_the_oldest_pair() -> None:
    # C=1 positive tokens: every cosine is exactly 1, so each compression merges slots 0 and 1.
    bank = MemoryBank(3)
    for i in range(10):
        bank.append(torch.full((1, 1, 1), float(i + 1), dtype=torch.float64), float(i))
    assert bank.counts[0, :, 0].tolist() == [8.0, 1.0, 1.0]
    assert bank.times[0, :, 0].tolist() == pytest.approx([3.5, 8.0, 9.0], abs=TOL)
    assert bank.tokens[0, :, 0, 0].tolist() == pytest.approx([4.5, 9.0, 10.0], abs=TOL)


# Regression: merging equal slots must leave them bit-identical, so exact similarity ties
# keep going to the earliest pair (a static scene must merge oldest-first).
@pytest.mark.parametrize('seed', range(2))
def test_identical_frames_always_merge_the_oldest_pair(seed: int) -> None:
    frame = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
    bank, ref = MemoryBank(3), RefStream(3)
    for i in range(12):
        bank.append(frame, float(i))
        ref.append(frame.numpy(), float(i))
    assert ref.counts[0].T.tolist() == [[10.0, 1.0, 1.0]] * 4
    close(bank.counts, ref.counts)
    close(bank.times, ref.times)


def test_weighted_times_keep_the_sum_of_frame_times() -> None:
    bank = MemoryBank(4)
    tokens = frame_stream(100, 2, 3, 5, seed=7)
    times = torch.rand(100, dtype=torch.float64).cumsum(0) * 10
    for i in range(100):
        bank.append(tokens[i], times[i].item())
        total = (bank.counts * bank.times).sum(1)
        assert torch.allclose(total, times[:i + 1].sum().expand(2, 3), rtol=1e-12, atol=0)


def test_no_capacity_never_compresses() -> None:
    bank = MemoryBank(None, {'x': 2})
    tokens = frame_stream(40, 2, 3, 4, seed=3)
    extra = torch.randn(40, 2, 3, 2, dtype=torch.float64)
    sizes = []
    for i in range(40):
        bank.append(tokens[i], float(i), {'x': extra[i]})
        sizes.append(bank.nbytes())
    assert len(bank) == 40
    assert bank.compressions == 0
    assert torch.equal(bank.tokens, tokens.transpose(0, 1))
    assert torch.equal(bank.ordered('x'), extra.transpose(0, 1))
    assert torch.equal(bank.counts, torch.ones(2, 40, 3, dtype=torch.float64))
    assert torch.equal(bank.times[0, :, 0], torch.arange(40.0, dtype=torch.float64))
    assert sizes[16] > sizes[15]  # storage grew past 16 frames
    assert sizes[-1] > sizes[16]


@pytest.mark.parametrize('capacity', [3, None])
@pytest.mark.parametrize('second_shape', [(2, 3, 4), (1, 5, 2)])
def test_reset_then_stream_equals_fresh_bank(capacity: int | None,
                                             second_shape: tuple[int, int, int]) -> None:
    first = frame_stream(30, 2, 3, 4, seed=11)
    second = frame_stream(50, *second_shape, seed=12)
    extra = torch.randn(50, second_shape[0], second_shape[1], 2, dtype=torch.float64)
    bank = MemoryBank(capacity, {'x': 2})
    for i in range(30):
        bank.append(first[i], 100.0 + i, {'x': torch.ones(2, 3, 2, dtype=torch.float64)})
    bank.reset()
    assert len(bank) == 0
    assert bank.frames_seen == 0
    with pytest.raises(RuntimeError, match='the bank is empty'):
        bank.ordered()
    fresh = MemoryBank(capacity, {'x': 2})
    for i in range(50):
        for target in (bank, fresh):
            target.append(second[i], float(i), {'x': extra[i]})
        assert len(bank) == len(fresh)
        assert torch.equal(bank.tokens, fresh.tokens)
        assert torch.equal(bank.counts, fresh.counts)
        assert torch.equal(bank.times, fresh.times)
        assert torch.equal(bank.ordered('x'), fresh.ordered('x'))
    assert bank.frames_seen == fresh.frames_seen == 50


def test_stream_memory_reset_clears_every_bank() -> None:
    memory = StreamMemory(3, MemorySpec(2), visual_fields={'a': 2}, query_fields={'b': 3})
    for i in range(5):
        memory.visual.append(torch.randn(1, 4, 6), float(i), {'a': torch.randn(1, 4, 2)})
        memory.query_bank.open_slot(float(i), torch.zeros(1, 8, 5))
        for layer in range(3):
            memory.query_bank.write('tokens', torch.randn(1, 8, 5), layer)
            memory.query_bank.write('b', torch.randn(1, 8, 3), layer)
        memory.query_bank.commit()
        memory.frames_seen += 1
    assert len(memory) == 2
    assert [len(bank) for bank in memory.queries] == [2, 2, 2]
    memory.reset()
    assert len(memory) == 0
    assert len(memory.visual) == 0
    assert [len(bank) for bank in memory.queries] == [0, 0, 0]
    assert [bank.frames_seen for bank in [memory.visual, *memory.queries]] == [0] * 4
    assert memory.frames_seen == 0


def test_stream_memory_without_cache_has_no_fields() -> None:
    memory = StreamMemory(2, MemorySpec(4, cache_projections=False), visual_fields={'a': 2},
                          query_fields={'b': 3})
    assert not memory.visual.has('a')
    assert not any(bank.has('b') for bank in memory.queries)
    assert memory.visual.has('tokens')


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize('capacity', [0, -1, -10])
def test_capacity_must_be_positive(capacity: int) -> None:
    with pytest.raises(ValueError, match=f'memory capacity must be >= 1 or None, got {capacity}'):
        MemoryBank(capacity)
    with pytest.raises(ConfigError, match='memory capacity must be >= 1'):
        MemorySpec(capacity)


@pytest.mark.parametrize('shape', [(2, 3, 5), (1, 3, 4), (2, 4, 4)])
def test_frame_that_does_not_fit_is_rejected(shape: tuple[int, int, int]) -> None:
    bank = MemoryBank(4)
    bank.append(torch.zeros(2, 3, 4), 0.0)
    with pytest.raises(ValueError, match=re.escape(f'frame tokens {shape} do not fit bank')):
        bank.append(torch.zeros(shape), 1.0)
    assert len(bank) == 1


def test_reading_an_empty_bank_or_writing_before_a_frame_fails() -> None:
    bank = MemoryBank(4, {'x': 2})
    with pytest.raises(RuntimeError, match='the bank is empty'):
        bank.view('tokens')
    with pytest.raises(RuntimeError, match=re.escape('write() before add_frame()')):
        bank.write('x', torch.zeros(1, 1, 2))
    bank.append(torch.zeros(1, 1, 3), 0.0)
    with pytest.raises(KeyError, match="bank has no field 'y'"):
        bank.ordered('y')


# -- long stream and properties ---------------------------------------------------------------


@pytest.mark.slow  # a long stream through the model
def test_long_stream_stays_bounded() -> None:
    # 20,000 appends (100,000 take about 25 s on a 2-core CPU).
    frames, capacity = 20_000, 5
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randn(frames, 1, 2, 4, generator=gen, dtype=torch.float64)
    bank = MemoryBank(capacity)
    with torch.inference_mode():
        for i in range(frames):
            bank.append(tokens[i], float(i))
            if i == capacity:
                size = bank.nbytes()
    assert len(bank) == capacity
    assert bank.frames_seen == frames
    assert torch.equal(bank.counts.sum(1), torch.full((1, 2), float(frames)))
    assert bank.nbytes() == size
    total = (bank.counts * bank.times).sum(1)
    assert torch.allclose(total, torch.full((1, 2), frames * (frames - 1) / 2.0,
                                            dtype=torch.float64), rtol=1e-12, atol=0)
    # Merged slots are averages of the frames they absorbed: inside the frames' range.
    assert (bank.tokens.abs() <= tokens.abs().amax()).all()


@pytest.mark.parametrize(('capacity', 'width', 'out'), [(1, 4, 3), (4, 6, 6), (10, 3, 8)])
def test_merging_commutes_with_an_affine_map(capacity: int, width: int, out: int) -> None:
    torch.manual_seed(capacity)
    linear = nn.Linear(width, out, dtype=torch.float64)
    nn.init.normal_(linear.bias, std=3.0)
    bank = MemoryBank(capacity, {'p': out})
    tokens = frame_stream(200, 2, 3, width, seed=capacity + 40)
    with torch.no_grad():
        for i in range(200):
            bank.append(tokens[i], float(i), {'p': linear(tokens[i])})
            projected = bank.ordered('p')
            assert torch.allclose(projected, linear(bank.tokens), atol=TOL, rtol=0)


@pytest.mark.parametrize('capacity', [1, 4, None])
def test_grouped_bank_equals_separate_banks(capacity: int | None) -> None:
    """Stacked groups (the per-layer query banks) behave exactly like independent banks."""
    generator = torch.Generator().manual_seed(7)
    groups, batch, positions, width = 3, 2, 5, 4
    stacked = MemoryBank(capacity, {'x': 3}, groups=groups)
    separate = [MemoryBank(capacity, {'x': 3}) for _ in range(groups)]
    for frame in range(60):
        tokens = torch.randn(groups, batch, positions, width, generator=generator,
                             dtype=torch.float64)
        extra = torch.randn(groups, batch, positions, 3, generator=generator,
                            dtype=torch.float64)
        stacked.open_slot(frame * 0.5, tokens[0])
        for g in range(groups):
            stacked.write('tokens', tokens[g], g)
            stacked.write('x', extra[g], g)
            separate[g].append(tokens[g], frame * 0.5, {'x': extra[g]})
        stacked.commit()
    for g, bank in enumerate(separate):
        rows = stacked.rows(g)
        assert len(rows) == len(bank)
        assert torch.equal(rows.tokens, bank.tokens)
        assert torch.equal(rows.ordered('x'), bank.ordered('x'))
        assert torch.equal(rows.counts, bank.counts)
        assert torch.equal(rows.times, bank.times)


def test_grouped_bank_refuses_single_group_calls() -> None:
    bank = MemoryBank(3, groups=2)
    with pytest.raises(RuntimeError, match='single-group'):
        bank.add_frame(torch.zeros(1, 2, 3), 0.0)
    bank.open_slot(0.0, torch.zeros(1, 2, 3))
    with pytest.raises(IndexError, match='group 2'):
        bank.write('tokens', torch.zeros(1, 2, 3), 2)
    with pytest.raises(RuntimeError, match='without commit'):
        bank.open_slot(1.0, torch.zeros(1, 2, 3))


# -- FIFO policy (the memory ablation's baseline) ---------------------------------------------


@pytest.mark.parametrize('capacity', [1, 3, 6])
def test_fifo_keeps_exactly_the_newest_frames(capacity: int) -> None:
    gen = torch.Generator().manual_seed(5)
    frames = torch.randn(20, 2, 4, 3, generator=gen, dtype=torch.float64)
    bank = MemoryBank(capacity, {'k': 2}, policy='fifo')
    for t, frame in enumerate(frames):
        bank.append(frame, float(t), {'k': frame[..., :2] * 3.0})
    kept = frames[-capacity:].transpose(0, 1)  # (B, capacity, N, C), oldest first
    torch.testing.assert_close(bank.tokens, kept, rtol=0, atol=1e-12)
    torch.testing.assert_close(bank.ordered('k'), kept[..., :2] * 3.0, rtol=0, atol=1e-12)
    expected_times = torch.arange(20 - capacity, 20, dtype=torch.float64)
    torch.testing.assert_close(bank.times, expected_times.view(1, -1, 1).expand(2, -1, 4))
    assert torch.equal(bank.counts, torch.ones(2, capacity, 4, dtype=torch.float64))


def test_fifo_and_mbc_differ_where_similar_frames_are_not_the_oldest() -> None:
    # Frames 1 and 2 are identical: MBC merges them and keeps frame 0; FIFO drops frame 0.
    frames = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    banks = {policy: MemoryBank(2, policy=policy) for policy in ('mbc', 'fifo')}
    for t, frame in enumerate(frames):
        for bank in banks.values():
            bank.append(frame.view(1, 1, 2), float(t))
    torch.testing.assert_close(banks['mbc'].tokens[0, :, 0], frames[:2])
    torch.testing.assert_close(banks['fifo'].tokens[0, :, 0], frames[1:])


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match='policy'):
        MemoryBank(3, policy='lifo')


@pytest.mark.parametrize('capacity,policy,groups', [(5, 'mbc', 1), (3, 'mbc', 2), (4, 'fifo', 1),
                                                     (None, 'mbc', 1)])
def test_age_ranks_follow_each_positions_temporal_order(capacity: int | None, policy: str,
                                                        groups: int) -> None:
    """During a step, every position's ranks are 0 (newest) .. len - 1 (oldest), in the order
    of its slots' ages: MBC merges each position on its own, so ranks differ across positions."""
    bank = MemoryBank(capacity, groups=groups, policy=policy)
    streams = [frame_stream(30, 2, 3, 4, seed=11 + group) for group in range(groups)]
    differs = False
    for t in range(30):
        now = 1.5 * t
        bank.open_slot(now, streams[0][t])
        for group in range(groups):
            bank.write('tokens', streams[group][t], group if groups > 1 else None)
        for group in range(groups) if groups > 1 else [None]:
            ranks, ages = bank.age_ranks(group), bank.ages(now, group)
            assert ranks.shape == ages.shape
            # Ages of one position are distinct (merged slots hold disjoint runs of frames), so
            # ranking them by age is the expected order.
            by_age = ages.argsort(dim=1).argsort(dim=1)
            assert torch.equal(ranks, by_age)
            assert torch.equal(ranks.sort(dim=1).values,
                               torch.arange(len(bank)).view(1, -1, 1).expand_as(ranks))
            differs |= bool((ranks != ranks[..., :1]).any())
            # The attention's places: the same ranks over the capacity, laid out for the bias.
            for dtype in (torch.float32, torch.float64):
                expected = order_places(ranks.flatten(1), capacity, dtype).unsqueeze(-1)
                assert torch.equal(bank.order_places(dtype, group), expected)
        bank.commit()
    assert differs == (capacity is not None and policy == 'mbc')


# -- decay field ------------------------------------------------------------------------------


@pytest.mark.parametrize('capacity,policy,groups', [(4, 'mbc', 1), (3, 'mbc', 2), (3, 'fifo', 1),
                                                     (None, 'mbc', 1)])
def test_decay_field_is_each_slots_mean_decay_over_its_frames(capacity: int | None, policy: str,
                                                              groups: int) -> None:
    """A one-hot field per frame, merged like everything else, says which frames (with weight
    1 / count) each slot holds; the decay field must equal those weights times each frame's
    exp(-age / tau), at every step, whatever merged."""
    frames, rates = 40, (3.0, 0.2, 1e-3)
    bank = MemoryBank(capacity, {'who': frames}, groups=groups, policy=policy,
                      decay_rates=rates)
    assert bank.fields == {'who': frames, 'decay': len(rates)}
    streams = [frame_stream(frames, 2, 3, 4, seed=21 + group) for group in range(groups)]
    times = (torch.rand(frames, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64) * 4).cumsum(0) + 100.0
    for t in range(frames):
        now = times[t].item()
        bank.open_slot(now, streams[0][t])
        who = torch.zeros(groups * 2, 3, frames, dtype=torch.float64)
        who[..., t] = 1.0
        for group in range(groups):
            rows = slice(2 * group, 2 * group + 2)
            bank.write('tokens', streams[group][t], group if groups > 1 else None)
            bank.write('who', who[rows], group if groups > 1 else None)
        frame_decay = torch.exp(-(now - times).clamp(min=0)[:, None]
                                * torch.tensor(rates, dtype=torch.float64))  # (frames, F)
        frame_decay[t + 1:] = 0.0  # not seen yet
        expected = bank.view('who') @ frame_decay
        torch.testing.assert_close(bank.decays(), expected, rtol=1e-10, atol=1e-13)
        bank.commit()
    assert bank.compressions == (0 if capacity is None else frames - capacity)


def test_decay_field_ignores_clock_jitter_and_restarts_after_reset() -> None:
    bank = MemoryBank(None, decay_rates=(1.0,))
    tokens = frame_stream(6, 1, 2, 3, seed=5)
    # 10 -> 12: two seconds; back to 11.5 (jitter): no time passes; 11.5 -> 13: one second
    # from the newest stamp seen (12), not 1.5 from the jittered one.
    for i, now in enumerate((10.0, 12.0, 11.5, 13.0)):
        bank.append(tokens[i], now)
    torch.testing.assert_close((bank.ordered('decay') * bank.decay_scale())[0, :, 0, 0],
                               torch.tensor([math.exp(-3), math.exp(-1), math.exp(-1), 1.0],
                                            dtype=torch.float64), rtol=1e-12, atol=0)
    bank.reset()
    bank.append(tokens[4], 500.0)
    bank.append(tokens[5], 501.0)
    torch.testing.assert_close(bank.decays()[0, :, 0, 0],
                               torch.tensor([math.exp(-1), 1.0], dtype=torch.float64),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize('rates,match', [((0.0,), 'finite and > 0'), ((-1.0,), 'finite and > 0'),
                                         ((math.inf,), 'finite and > 0'),
                                         ((math.nan,), 'finite and > 0')])
def test_bad_decay_rates_are_refused(rates: tuple[float, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MemoryBank(4, decay_rates=rates)


def test_decay_is_a_reserved_field_name() -> None:
    with pytest.raises(ValueError, match="'decay' is reserved"):
        MemoryBank(4, {'decay': 2}, decay_rates=(1.0,))


def test_stream_memory_keeps_decays_without_cached_projections() -> None:
    decays = Decays((1.0, 0.1), {'v': 2})
    cached = StreamMemory(2, MemorySpec(4), visual_fields={'k': 3, 'v': 6},
                          query_fields={'k': 3}, visual_decays=decays)
    assert cached.visual.fields == {'k': 3, 'v': 6} and cached.visual.decay_fields == {'v': 2}
    assert cached.query_bank.decay_fields == {} and not cached.query_bank.decay_rates
    bare = StreamMemory(2, MemorySpec(4, cache_projections=False), visual_fields={'k': 3, 'v': 6},
                        query_fields={'k': 3}, visual_decays=decays)
    assert bare.visual.fields == {'decay': 2} and bare.visual.decay_fields == {'decay': 1}
    assert bare.query_bank.fields == {}


def test_decays_held_in_each_part_of_a_field_equal_a_field_of_their_own() -> None:
    """Cached values carry the decays after each head's channels (parts); aged and merged in
    place there, they equal the decays of a bank that keeps them apart, in every part."""
    rates = (2.0, 0.05)
    apart = MemoryBank(3, decay_rates=rates)
    inside = MemoryBank(3, {'v': 3 * (4 + 2)}, decay_rates=rates, decay_fields={'v': 3})
    assert inside.fields == {'v': 18} and 'decay' not in inside.fields
    tokens = frame_stream(25, 2, 3, 5, seed=8)
    values = torch.randn(25, 2, 3, 3 * 4, dtype=torch.float64)  # written without the decays
    for t in range(25):
        now = 0.7 * t + (0.3 if t % 4 == 0 else 0.0)
        apart.append(tokens[t], now)
        inside.append(tokens[t], now, {'v': values[t]})
        assert torch.equal(inside.decays(), apart.decays())
        parts = inside.view('v').unflatten(-1, (3, 6))
        every_part = inside.decays().unsqueeze(-2).expand(-1, -1, -1, 3, -1)
        assert torch.equal(parts[..., -2:] * inside.decay_scale(), every_part)
    assert apart.compressions == inside.compressions == 22
    # The value channels hold exactly what was written, merged with the tokens' weights: the
    # same as a bank that stores the values as a plain field.
    plain = MemoryBank(3, {'v': 12})
    for t in range(25):
        plain.append(tokens[t], 0.7 * t, {'v': values[t]})
    stored = inside.ordered('v').unflatten(-1, (3, 6))[..., :4].flatten(-2)
    torch.testing.assert_close(stored, plain.ordered('v'), rtol=0, atol=1e-12)


@pytest.mark.parametrize('fields,decay_fields,match', [
    ({'v': 5}, {'v': 2}, "cannot hold 2 part"),  # 5 channels do not split in two
    ({'v': 6}, {'v': 3}, "cannot hold 3 part"),  # parts of 2 cannot hold 3 decays
    ({}, {'v': 1}, "cannot hold 1 part"),  # no such field
])
def test_decay_fields_that_cannot_hold_the_decays_are_refused(fields: dict[str, int],
                                                               decay_fields: dict[str, int],
                                                               match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MemoryBank(4, fields, decay_rates=(1.0, 0.5, 0.1), decay_fields=decay_fields)
    with pytest.raises(ValueError, match='decay_fields without decay_rates'):
        MemoryBank(4, {'v': 6}, decay_fields={'v': 1})


def test_decays_stay_exact_in_float32_with_the_clock_a_day_in() -> None:
    """Stored decays are relative to a reference time that moves on (rescaled in place every
    8 s here); 90 frames a day into the clock, in float32, must still give exp(-age / tau) at
    every scale, finite."""
    rates = (2.0, 0.1, 1 / 2000)
    bank = MemoryBank(3, {'v': 2 * (1 + 3)}, policy='fifo', decay_rates=rates,
                      decay_fields={'v': 2})
    frame = torch.ones(1, 2, 4)
    value = torch.zeros(1, 2, 2)
    for t in range(86_400 - 50, 86_400):  # the clock starts late: nothing depends on it
        bank.append(frame + t % 7, float(t), {'v': value})
    for t in range(86_400, 86_400 + 40):
        bank.append(frame, float(t), {'v': value})
    ages = torch.tensor([2.0, 1.0, 0.0]).view(1, 3, 1, 1)  # FIFO keeps the newest three
    expected = torch.exp(-ages * torch.tensor(rates))
    stored = bank.ordered('v').unflatten(-1, (2, 4))[..., -3:]
    assert torch.isfinite(stored).all() and stored.abs().max() < math.exp(17)
    for part in range(2):
        torch.testing.assert_close(stored[..., part, :] * bank.decay_scale(),
                                   expected.expand(1, 3, 2, 3).float(), rtol=1e-5, atol=1e-30)
