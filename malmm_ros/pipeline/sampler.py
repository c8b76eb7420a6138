"""Subsample a camera stream to a target rate: by frame stamps, and by arrival when they fail."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ['Admission', 'FrameSampler', 'StreamSampler']


class FrameSampler:
    """Accepts frames on a fixed grid of `fps`, keyed by stamp, not by arrival count.

    A 30 fps camera sampled at 4 fps yields 4 frames per second on average: the grid advances
    by one period per accepted frame, so rounding does not accumulate into drift. A frame less
    than half a camera interval before its due time counts as on time (it is the frame nearest
    the grid), so stamp jitter does not drop frames when sampling close to the camera rate.
    """

    def __init__(self, fps: float) -> None:
        if fps < 0:
            raise ValueError(f'sample rate must be >= 0, got {fps}')
        self.period_ns = round(1e9 / fps) if fps > 0 else 0
        self.reset()

    def reset(self) -> None:
        """Start a new grid at the next frame."""
        self._next_due: int | None = None
        self._last_stamp: int | None = None
        self._interval_ns = 0.0  # running estimate of the camera's frame interval

    def accept(self, stamp_ns: int) -> bool:
        """Whether the frame stamped `stamp_ns` is sampled (advances the grid if so)."""
        if self._last_stamp is not None and stamp_ns > self._last_stamp:
            gap = stamp_ns - self._last_stamp
            self._interval_ns = gap if not self._interval_ns else (
                0.9 * self._interval_ns + 0.1 * gap)
        self._last_stamp = stamp_ns
        if self.period_ns == 0:
            return True
        early = min(0.5 * self._interval_ns, 0.5 * self.period_ns)
        if self._next_due is not None and stamp_ns < self._next_due - early:
            return False
        if self._next_due is None or stamp_ns >= self._next_due + self.period_ns:
            self._next_due = stamp_ns + self.period_ns  # first frame, or fell a period behind
        else:
            self._next_due += self.period_ns
        return True


@dataclass(frozen=True)
class Admission:
    """The sampling stage's verdict on one frame."""

    accepted: bool  # feed this frame to the memory
    time_ns: int  # its time on the memory's clock: the stamp, or the arrival when stamps fail
    epoch: int  # changes whenever the memory must start over (a looped bag, a gap, a new clock)
    reset_reason: str | None = None  # why the epoch changed on this frame


class StreamSampler:
    """The one sampling stage of the node, the evaluator and the pipeline.

    Frames are sampled on a grid of `fps` by header stamp (FrameSampler), and the memory is told
    to start over when the stream does (a stamp going back once, as a looping bag does, or a gap
    over `max_gap_s`). Stamps that fail as a clock (all zero, constant, or going back on frame
    after frame: a driver that never fills the header) would give one prediction and then
    silence, or a reset on every frame. When the arrival time of each frame is given
    (`arrival_ns`, a monotonic clock), such a stream is detected (`problem` says how) and
    sampled and timed by arrival instead, until the stamps advance again. With an arrival
    clock, frames are also never taken faster than `fps` by arrival time (a bag replayed
    faster than real time, stamps in the wrong unit), allowing a burst of `burst` frames of
    jitter; refused frames are counted in `rate_limited`.
    """

    WINDOW = 8  # recent stamp steps looked at
    BAD_STEPS = 3  # non-advancing steps among them that make the stamps unusable

    def __init__(self, fps: float, max_gap_s: float = 0.0, *, burst: float = 2.0) -> None:
        if fps < 0 or max_gap_s < 0:
            raise ValueError(f'sample rate and max gap must be >= 0, got {fps}, {max_gap_s}')
        self.fps = fps
        self.max_gap_ns = round(max_gap_s * 1e9)
        self.burst = burst
        self.epoch = 0
        self.resets = 0  # epoch changes forced by the stream (not reset() calls)
        self.rate_limited = 0
        self.by_arrival = False  # sampling and timing by arrival: the stamps are unusable
        self.problem: str | None = None
        self._stamp_grid = FrameSampler(fps)
        self._arrival_grid = FrameSampler(fps)
        self._steps: deque[str | None] = deque(maxlen=self.WINDOW)  # None: the stamp advanced
        self._last_stamp: int | None = None
        self._tokens = burst
        self._last_arrival: int | None = None

    def set_rates(self, fps: float, max_gap_s: float) -> None:
        """New sampling rate and gap limit for the frames to come (the epoch stays)."""
        if fps != self.fps:
            self.fps = fps
            self._stamp_grid, self._arrival_grid = FrameSampler(fps), FrameSampler(fps)
            self._tokens = self.burst
        self.max_gap_ns = round(max_gap_s * 1e9)

    def reset(self) -> None:
        """Forget the stream (a reset request): new grids, a new epoch, stamps trusted again."""
        self.epoch += 1
        self._stamp_grid.reset()
        self._arrival_grid.reset()
        self._steps.clear()
        self._last_stamp = None
        self.by_arrival = False
        self.problem = None

    def admit(self, stamp_ns: int, arrival_ns: int | None = None) -> Admission:
        """Decide for the frame stamped `stamp_ns` that arrived at `arrival_ns` (or unknown)."""
        stamp_ns = int(stamp_ns)
        reason = self._follow_stamps(stamp_ns, arrival_ns is not None)
        if self.by_arrival:
            assert arrival_ns is not None  # by_arrival is only entered with an arrival clock
            accepted = self._arrival_grid.accept(arrival_ns)
            return Admission(accepted, arrival_ns, self.epoch, reason)
        if arrival_ns is not None and self.fps > 0 and not self._has_token(arrival_ns):
            # Over the rate by arrival: refused before the stamp grid moves, so the next
            # frame still gets the slot.
            self.rate_limited += 1
            return Admission(False, stamp_ns, self.epoch, reason)
        accepted = self._stamp_grid.accept(stamp_ns)
        if accepted and arrival_ns is not None and self.fps > 0:
            self._tokens -= 1.0
        return Admission(accepted, stamp_ns, self.epoch, reason)

    # -- helpers ----------------------------------------------------------------------------

    def _follow_stamps(self, stamp_ns: int, can_use_arrival: bool) -> str | None:
        """Classify the step from the previous stamp; returns why the memory starts over."""
        last, self._last_stamp = self._last_stamp, stamp_ns
        if last is None:
            return None
        if stamp_ns > last:
            step = None
        elif stamp_ns == last:
            step = 'zero stamps' if stamp_ns == 0 else 'constant stamps'
        else:
            step = 'stamps going back on every frame'
        self._steps.append(step)
        bad = [s for s in self._steps if s is not None]
        if self.by_arrival:
            if len(self._steps) == self.WINDOW and not bad:
                self.by_arrival, self.problem = False, None
                return self._new_epoch('stamps advance again: sampling by stamp')
            return None
        if len(bad) >= self.BAD_STEPS:
            self.problem = f'{bad[-1]} ({len(bad)} of the last {len(self._steps)} frames)'
            if can_use_arrival:
                self.by_arrival = True
                self._arrival_grid.reset()
                return self._new_epoch(f'{bad[-1]}: sampling and timing by arrival instead')
        elif not bad:
            self.problem = None
        if step is not None and stamp_ns < last and len(bad) < self.BAD_STEPS:
            return self._new_epoch(f'stamp went backwards by {(last - stamp_ns) * 1e-9:.3f} s')
        if step is None and self.max_gap_ns and stamp_ns - last > self.max_gap_ns:
            return self._new_epoch(f'gap of {(stamp_ns - last) * 1e-9:.3f} s > max_gap_s')
        return None

    def _new_epoch(self, reason: str) -> str:
        self.epoch += 1
        self.resets += 1
        self._stamp_grid.reset()
        return reason

    def _has_token(self, arrival_ns: int) -> bool:
        """Token bucket at `fps` by arrival time, holding at most `burst` frames."""
        if self._last_arrival is not None and arrival_ns > self._last_arrival:
            self._tokens = min(self.burst,
                               self._tokens + (arrival_ns - self._last_arrival) * 1e-9 * self.fps)
        self._last_arrival = arrival_ns
        return self._tokens >= 1.0
