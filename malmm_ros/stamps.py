"""ROS time stamps ({sec, nanosec}, builtin_interfaces/Time) <-> integer nanoseconds.

Integer nanoseconds everywhere inside: float64 seconds cannot hold an epoch stamp to the
nanosecond. A stamp whose nanosec is not below 1e9 (or whose sec is negative) is not a time and is
refused here, once, for every reader (header stamps, JSON messages).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from malmm_ros.errors import FrameError

__all__ = ['NS_PER_S', 'stamp_dict', 'stamp_ns', 'stamp_parts']

NS_PER_S = 1_000_000_000


def stamp_ns(stamp: Any) -> int:
    """Nanoseconds of a builtin_interfaces/Time-like object (.sec, .nanosec) or a {sec, nanosec}
    mapping; FrameError for one that is not a valid time."""
    try:
        if isinstance(stamp, Mapping):
            sec, nanosec = int(stamp['sec']), int(stamp['nanosec'])
        else:
            sec, nanosec = int(stamp.sec), int(stamp.nanosec)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise FrameError(f'not a stamp {{sec, nanosec}}: {stamp!r:.80}') from None
    if sec < 0 or not 0 <= nanosec < NS_PER_S:
        raise FrameError(f'stamp {sec} s {nanosec} ns is not a valid time (sec must be >= 0 and '
                         'nanosec below 1e9)')
    return sec * NS_PER_S + nanosec


def stamp_parts(ns: int) -> tuple[int, int]:
    """(sec, nanosec) of a stamp in nanoseconds."""
    return divmod(int(ns), NS_PER_S)


def stamp_dict(ns: int) -> dict[str, int]:
    """{'sec', 'nanosec'}: how our JSON messages carry a stamp."""
    sec, nanosec = stamp_parts(ns)
    return {'sec': sec, 'nanosec': nanosec}
