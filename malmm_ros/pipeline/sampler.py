"""Subsample a camera stream to a target rate by frame stamps."""

from __future__ import annotations

__all__ = ['FrameSampler']


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
