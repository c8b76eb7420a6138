"""Camera silence in the node's clock (issue 14 item 4): wall time by default, sim time with
use_sim_time. Times are handed in, so every case is exact and independent of the machine."""

from __future__ import annotations

import threading

import pytest

from malmm_ros.ros.staleness import WAITING_FOR_CLOCK, CameraSilence, Staleness

S = 1_000_000_000
WALL0 = 50 * S  # monotonic time the node started
SIM0 = 1_700_000_000 * S  # a bag's time
STALE = 2.0


def _wall(silence: CameraSilence, wall_ns: int, ros_ns: int = 0) -> Staleness:
    return silence.check(wall_ns, ros_ns, sim_time=False, stale_after_s=STALE)


def _sim(silence: CameraSilence, ros_ns: int, wall_ns: int = WALL0) -> Staleness:
    return silence.check(wall_ns, ros_ns, sim_time=True, stale_after_s=STALE)


# -- wall clock (the default) -----------------------------------------------------------------


def test_wall_silence_counts_from_start_until_the_first_frame() -> None:
    silence = CameraSilence(WALL0)
    early = _wall(silence, WALL0 + S)
    assert early == Staleness('wall', 1.0, False, True)
    late = _wall(silence, WALL0 + 3 * S)
    assert late.starved and late.never and late.silence_s == 3.0


def test_wall_silence_counts_from_the_newest_frame() -> None:
    silence = CameraSilence(WALL0)
    silence.frame(WALL0 + 10 * S, SIM0)
    assert _wall(silence, WALL0 + 11 * S) == Staleness('wall', 1.0, False, False)
    verdict = _wall(silence, WALL0 + 12 * S + 1)
    assert verdict.starved and not verdict.never
    assert verdict.values() == {'clock': 'wall', 'silence_s': '2.0'}


def test_wall_silence_ignores_the_ros_clock() -> None:
    silence = CameraSilence(WALL0)
    silence.frame(WALL0, SIM0)
    # The ROS clock reading far ahead or back changes nothing without sim time.
    assert _wall(silence, WALL0 + S, SIM0 + 100 * S).silence_s == 1.0
    assert _wall(silence, WALL0 + S, 0).silence_s == 1.0


# -- sim time ---------------------------------------------------------------------------------


def test_sim_time_before_any_clock_is_waiting_not_starved() -> None:
    silence = CameraSilence(WALL0)
    verdict = _sim(silence, 0, wall_ns=WALL0 + 3600 * S)  # an hour of wall time, no /clock
    assert verdict == Staleness('sim', None, False, True, WAITING_FOR_CLOCK)
    assert verdict.values() == {'clock': 'sim', 'silence_s': WAITING_FOR_CLOCK}


def test_sim_silence_counts_from_the_first_clock_seen() -> None:
    silence = CameraSilence(WALL0)
    assert _sim(silence, SIM0).silence_s == 0.0
    verdict = _sim(silence, SIM0 + 3 * S)
    assert verdict.starved and verdict.never and verdict.clock == 'sim'
    assert verdict.silence_s == 3.0


def test_paused_sim_clock_is_not_silence_however_long_the_wall_gap() -> None:
    silence = CameraSilence(WALL0)
    silence.frame(WALL0, SIM0)
    for hours in (1, 2, 10):  # the bag is paused: sim time stands still
        verdict = _sim(silence, SIM0 + S // 2, wall_ns=WALL0 + hours * 3600 * S)
        assert verdict == Staleness('sim', 0.5, False, False)


def test_advancing_sim_clock_without_frames_is_starved() -> None:
    silence = CameraSilence(WALL0)
    silence.frame(WALL0, SIM0)
    verdict = _sim(silence, SIM0 + 5 * S, wall_ns=WALL0)  # sim time ran ahead (fast replay)
    assert verdict.starved and not verdict.never and verdict.silence_s == 5.0


def test_frames_before_the_first_clock_count_from_the_clock() -> None:
    silence = CameraSilence(WALL0)
    silence.frame(WALL0, 0)  # a frame while the clock still reads 0
    assert _sim(silence, 0).note == WAITING_FOR_CLOCK
    assert _sim(silence, SIM0).silence_s == 0.0  # not SIM0 seconds of silence
    assert _sim(silence, SIM0 + S).silence_s == 1.0


def test_a_frame_resets_sim_silence() -> None:
    silence = CameraSilence(WALL0)
    _sim(silence, SIM0)
    assert _sim(silence, SIM0 + 3 * S).starved
    silence.frame(WALL0, SIM0 + 3 * S)
    assert not _sim(silence, SIM0 + 4 * S).starved
    assert _sim(silence, SIM0 + 4 * S).silence_s == 1.0


def test_clock_jumping_back_restarts_the_count() -> None:
    silence = CameraSilence(WALL0)
    silence.frame(WALL0, SIM0 + 10 * S)  # end of the bag's first pass
    assert _sim(silence, SIM0 + 10 * S).silence_s == 0.0
    # --loop: the bag restarts; the frame from the future must not hide silence for 10 s.
    assert _sim(silence, SIM0).silence_s == 0.0
    verdict = _sim(silence, SIM0 + 3 * S)
    assert verdict.starved and verdict.silence_s == 3.0
    silence.frame(WALL0, SIM0 + 3 * S)
    assert _sim(silence, SIM0 + 3 * S).silence_s == 0.0


def test_a_frame_after_a_jump_back_is_seen_by_the_frame_alone() -> None:
    silence = CameraSilence(WALL0)
    _sim(silence, SIM0 + 10 * S)
    silence.frame(WALL0, SIM0 + S)  # the first frame of the next pass, before any check
    assert _sim(silence, SIM0 + 2 * S).silence_s == 1.0


@pytest.mark.parametrize('first', ['wall', 'sim'])
def test_switching_use_sim_time_starts_afresh(first: str) -> None:
    silence = CameraSilence(WALL0)
    silence.frame(WALL0, 1_800_000_000 * S)  # wall mode: the ROS clock is system time
    if first == 'sim':
        _sim(silence, SIM0)
        assert _sim(silence, SIM0 + 3 * S).starved
    # To sim time: system-time frames are not sim frames; silence counts from the first clock.
    assert _wall(silence, WALL0 + S).silence_s == 1.0  # and back to wall: the wall frame counts
    assert _sim(silence, SIM0 + 7 * S).silence_s == 0.0
    assert _sim(silence, SIM0 + 8 * S).silence_s == 1.0


def test_sim_silence_never_goes_negative() -> None:
    silence = CameraSilence(WALL0)
    _sim(silence, SIM0)
    silence.frame(WALL0, SIM0 + 2 * S)
    assert _sim(silence, SIM0 + 2 * S).silence_s == 0.0


def test_concurrent_frames_and_checks() -> None:
    """The image callback and the diagnostics timer run on different threads."""
    silence = CameraSilence(WALL0)
    stop = threading.Event()
    verdicts: list[Staleness] = []

    def frames() -> None:
        k = 0
        while not stop.is_set():
            k += 1
            silence.frame(WALL0 + k, SIM0 + k)

    thread = threading.Thread(target=frames, daemon=True)
    thread.start()
    try:
        for k in range(2000):
            verdicts.append(_sim(silence, SIM0 + 10**6 + k))
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert all(v.silence_s is not None and v.silence_s >= 0 for v in verdicts)
