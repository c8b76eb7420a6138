"""Tests of FrameSampler: stamp-keyed subsampling to a target rate."""

from __future__ import annotations

import random

import pytest

from malmm_ros.pipeline.sampler import FrameSampler

NS = 1_000_000_000
CAMERA_PERIOD_NS = 33_333_333  # 30 fps


def _count(sampler: FrameSampler, stamps: list[int]) -> int:
    return sum(sampler.accept(s) for s in stamps)


def _camera(seconds: float, period_ns: int = CAMERA_PERIOD_NS, start_ns: int = 0) -> list[int]:
    return [start_ns + k * period_ns for k in range(int(seconds * NS / period_ns))]


@pytest.mark.parametrize('fps', [4.0, 1.0, 7.5, 10.0])
def test_average_rate_over_a_minute(fps: float) -> None:
    stamps = _camera(60.0)
    accepted = _count(FrameSampler(fps), stamps)
    assert abs(accepted - fps * 60) <= 1


def test_accepted_frames_are_spread_evenly() -> None:
    sampler = FrameSampler(4.0)
    accepted = [s for s in _camera(60.0) if sampler.accept(s)]
    gaps = {b - a for a, b in zip(accepted, accepted[1:], strict=False)}
    # 250 ms lies between 7 and 8 camera periods; never two frames in a row or a skipped slot
    assert gaps <= {7 * CAMERA_PERIOD_NS, 8 * CAMERA_PERIOD_NS}


@pytest.mark.parametrize(
    ('fps', 'every', 'jitter_ms'),
    # jitter stays within the 5 % tolerance even when the first frame jitters the other way
    [(10.0, 3, 0), (15.0, 2, 0), (30.0, 1, 0), (6.0, 5, 0), (10.0, 3, 2), (15.0, 2, 1),
     (6.0, 5, 3)],
)
def test_divisor_rates_pick_evenly_spaced_frames(fps: float, every: int, jitter_ms: int) -> None:
    """30 fps stamps run a nanosecond early of the grid (k * 33_333_333); they count as on time."""
    rng = random.Random(every)
    stamps = [s + rng.randint(-jitter_ms, jitter_ms) * 1_000_000 + 5_000_000
              for s in _camera(10.0)]
    sampler = FrameSampler(fps)
    picked = [k for k, s in enumerate(stamps) if sampler.accept(s)]
    assert picked == list(range(0, len(stamps), every))


@pytest.mark.parametrize('start_ns', [0, 1_700_000_000 * NS + 123_456_789])
def test_first_frame_always_accepted(start_ns: int) -> None:
    sampler = FrameSampler(0.1)
    assert sampler.accept(start_ns)
    assert not sampler.accept(start_ns + 1)
    assert not sampler.accept(start_ns + 5 * NS)


def test_zero_fps_accepts_every_frame() -> None:
    sampler = FrameSampler(0)
    stamps = _camera(5.0) + [0, 0, 10]  # even repeated or backwards stamps
    assert _count(sampler, stamps) == len(stamps)


@pytest.mark.parametrize(('camera_fps', 'fps'), [(2.0, 4.0), (4.0, 4.0), (1.0, 30.0)])
def test_input_slower_than_target_accepts_all(camera_fps: float, fps: float) -> None:
    stamps = _camera(20.0, period_ns=round(NS / camera_fps))
    assert _count(FrameSampler(fps), stamps) == len(stamps)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_jitter_changes_count_by_at_most_one(seed: int) -> None:
    rng = random.Random(seed)
    clean = _camera(60.0)
    jittered = [s + rng.randint(-3_000_000, 3_000_000) for s in clean]
    jittered[0] = max(jittered[0], 0)
    assert jittered == sorted(jittered)
    assert abs(_count(FrameSampler(4.0), jittered) - _count(FrameSampler(4.0), clean)) <= 1


def test_reset_restarts_the_grid() -> None:
    sampler = FrameSampler(1.0)
    assert sampler.accept(0)
    assert not sampler.accept(NS // 2)
    sampler.reset()
    assert sampler.accept(NS // 2)  # first frame after reset
    assert not sampler.accept(NS)  # the grid now runs from 0.5 s
    assert sampler.accept(3 * NS // 2)


def test_falling_behind_restarts_the_grid_instead_of_bursting() -> None:
    sampler = FrameSampler(4.0)
    assert sampler.accept(0)
    assert sampler.accept(10 * NS)  # a 10 s hole
    # no burst of catch-up frames: the next due frame is one period later
    assert not sampler.accept(10 * NS + CAMERA_PERIOD_NS)
    assert sampler.accept(10 * NS + NS // 4)


@pytest.mark.parametrize('fps', [-1, -0.5])
def test_negative_fps_rejected(fps: float) -> None:
    with pytest.raises(ValueError, match='sample rate must be >= 0'):
        FrameSampler(fps)
