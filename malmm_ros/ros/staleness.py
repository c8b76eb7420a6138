"""How long the camera has been silent, counted in the clock the node runs on (issue 14).

With use_sim_time, silence is sim time: a paused /clock (a paused or finished bag) is not a
dead camera, and wall time that passes while the sim clock stands still is not silence; sim
time that advances without frames is. Before the first /clock the node's clock reads 0: that
is "waiting for /clock", never starved. Without sim time, the monotonic clock as always.

No rclpy here: the node hands in int nanoseconds (monotonic and its ROS clock's now) from its
image callback (`frame`) and its diagnostics timer (`check`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

__all__ = ['WAITING_FOR_CLOCK', 'CameraSilence', 'Staleness']

WAITING_FOR_CLOCK = 'waiting for /clock'


@dataclass(frozen=True)
class Staleness:
    """One verdict of `CameraSilence.check`."""

    clock: str  # 'wall' | 'sim': the clock silence_s is counted in
    silence_s: float | None  # None while sim time waits for its first /clock
    starved: bool
    never: bool  # no frame arrived since the node started
    note: str | None = None  # WAITING_FOR_CLOCK, or None

    def values(self) -> dict[str, str]:
        """The diagnostics key/values: `clock` and `silence_s` (the note while waiting)."""
        silence = f'{self.silence_s:.1f}' if self.silence_s is not None else self.note or 'n/a'
        return {'clock': self.clock, 'silence_s': silence}


class CameraSilence:
    """The newest frame's arrival in both clocks; thread-safe (callback and timer threads)."""

    def __init__(self, wall_start_ns: int) -> None:
        self._lock = threading.Lock()
        self._wall_start = wall_start_ns
        self._wall_frame: int | None = None
        self._sim: bool | None = None  # the clock of the previous check
        self._reset_sim()

    def _reset_sim(self) -> None:
        self._since: int | None = None  # sim silence counts from here: first /clock, jump back
        self._sim_frame: int | None = None  # ROS time of the newest frame (once a clock ran)
        self._latest = 0  # newest ROS time seen: a smaller one is the clock jumping back

    def _observe(self, ros_ns: int) -> None:
        if ros_ns <= 0:
            return  # sim time not started: nothing to count from
        if self._since is None or ros_ns < self._latest:
            # The first clock, or a jump back (a looped bag): silence starts again here, and
            # frames stamped in the abandoned future no longer count.
            self._since = ros_ns
            if self._sim_frame is not None and self._sim_frame > ros_ns:
                self._sim_frame = None
        self._latest = ros_ns

    def frame(self, wall_ns: int, ros_ns: int) -> None:
        """A frame arrived at monotonic `wall_ns`, when the node's ROS clock read `ros_ns`."""
        with self._lock:
            self._wall_frame = wall_ns
            self._observe(ros_ns)
            if ros_ns > 0:
                self._sim_frame = ros_ns

    def check(self, wall_ns: int, ros_ns: int, *, sim_time: bool, stale_after_s: float
              ) -> Staleness:
        """Silence now, in sim time when `sim_time` (the node's clock follows /clock), else in
        monotonic time; starved when longer than `stale_after_s`."""
        with self._lock:
            never = self._wall_frame is None
            if self._sim is not None and sim_time != self._sim:
                self._reset_sim()  # use_sim_time changed: the ROS times seen mean nothing now
            self._sim = sim_time
            if not sim_time:
                last = self._wall_frame if self._wall_frame is not None else self._wall_start
                silence = max(0, wall_ns - last) / 1e9
                return Staleness('wall', silence, silence > stale_after_s, never)
            self._observe(ros_ns)
            if ros_ns <= 0 or self._since is None:
                return Staleness('sim', None, False, never, WAITING_FOR_CLOCK)
            since = max(self._since, self._sim_frame or 0)
            silence = max(0, ros_ns - since) / 1e9
            return Staleness('sim', silence, silence > stale_after_s, never)
