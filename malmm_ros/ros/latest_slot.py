"""A keep-latest handoff between the image callback and the inference thread.

The callback never waits and nothing queues: a frame that arrives while the previous one is
still waiting replaces it and is counted as dropped, so inference always works on the newest
frame (queued stale frames are the top latency complaint about camera nodes).
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ['LatestSlot']


class LatestSlot:
    """One slot, thread-safe: `put` from the producer, `take` from the consumer."""

    def __init__(self) -> None:
        self._item: Any = None
        self._full = False
        self._cond = threading.Condition()
        self.dropped = 0

    def put(self, item: Any) -> bool:
        """Store `item`; True if it replaced one the consumer never took (a drop)."""
        with self._cond:
            replaced = self._full
            if replaced:
                self.dropped += 1
            self._item, self._full = item, True
            self._cond.notify()
            return replaced

    def take(self, timeout: float | None = None) -> Any:
        """The newest item, waiting up to `timeout` s; None if none arrived."""
        with self._cond:
            if not self._full and not self._cond.wait_for(lambda: self._full, timeout):
                return None
            item, self._item, self._full = self._item, None, False
            return item

    def clear(self) -> None:
        """Drop a waiting item without counting it (used on reset)."""
        with self._cond:
            self._item, self._full = None, False
