"""The text describer's own thread: one description at a time, never in the predictions' way.

The inference thread hands over the query outputs of a prediction and goes on at once. While a
description is being written, further requests are dropped (and counted) rather than queued:
a description of an old frame is worth less than the next prediction. The thread runs at a
lower scheduling priority, so on a busy CPU the kernel favours the inference thread.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch only where text is on: runtime onnx never imports it
    import torch

    from malmm_ros.model.text import Description, Grounding, TextDescriber

__all__ = ['DescriptionWorker']

_log = logging.getLogger(__name__)
NICE = 10  # added to the describer thread's niceness (Linux: per thread)


class DescriptionWorker:
    """Runs `describer.generate` on a thread of its own and hands each result to `publish`.

    `submit` never blocks; `describer` may be swapped (or set to None) at any time and applies
    from the next request on. `on_error(exc)` is told about a failed generation.
    """

    def __init__(self, describer: TextDescriber | None,
                 publish: Callable[[Description], None],
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.describer = describer
        self._publish = publish
        self._on_error = on_error
        self._cond = threading.Condition()
        self._request: tuple[TextDescriber, torch.Tensor, int, str, Grounding | None] | None \
            = None
        self._busy = False
        self._stop = threading.Event()
        self.requested = 0
        self.published = 0
        self.dropped_busy = 0
        self.failed = 0
        self.latency_ms: deque = deque(maxlen=100)
        self._thread = threading.Thread(target=self._loop, name='malmm_text', daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._busy

    def submit(self, queries: torch.Tensor, stamp_ns: int, frame_id: str = '',
               grounding: Grounding | None = None) -> bool:
        """Ask for a description of `queries` [1, Q, D] (and the prediction they made, to name
        in the prompt); False if dropped (busy or no describer)."""
        describer = self.describer
        if describer is None:
            return False
        with self._cond:
            self.requested += 1
            if self._busy:
                self.dropped_busy += 1
                return False
            self._busy = True
            self._request = (describer, queries, int(stamp_ns), frame_id, grounding)
            self._cond.notify()
            return True

    def values(self) -> dict[str, Any]:
        """Counts and latency for /diagnostics."""
        with self._cond:
            latency = np.array(self.latency_ms) if self.latency_ms else None
            values: dict[str, Any] = {
                'text_requested': self.requested, 'text_published': self.published,
                'text_dropped_busy': self.dropped_busy, 'text_failed': self.failed,
                'text_busy': self._busy,
            }
        values['text_latency_last_ms'] = (f'{self.latency_ms[-1]:.1f}' if latency is not None
                                          else 'n/a')
        values['text_latency_p50_ms'] = (f'{np.percentile(latency, 50):.1f}'
                                         if latency is not None else 'n/a')
        return values

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread; a description being written is abandoned within a token."""
        self._stop.set()
        with self._cond:
            self._cond.notify()
        self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        try:  # a lower priority for this thread only (the TID names one thread on Linux)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + NICE)
        except (OSError, AttributeError):  # not Linux, or not allowed: run at normal priority
            _log.debug('could not lower the text thread priority')
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: self._request is not None or self._stop.is_set())
                request, self._request = self._request, None
            if request is None:
                continue
            describer, queries, stamp_ns, frame_id, grounding = request
            try:
                description = describer.generate(queries, stamp_ns=stamp_ns, frame_id=frame_id,
                                                 cancel=self._stop.is_set, grounding=grounding)
                if description is not None:
                    self._publish(description)
            except Exception as exc:  # the thread must outlive any one description
                if self._stop.is_set():
                    return
                with self._cond:
                    self.failed += 1
                if self._on_error is not None:
                    self._on_error(exc)
            else:
                if description is not None:
                    with self._cond:
                        self.published += 1
                        self.latency_ms.append(description.latency_ms)
            finally:
                with self._cond:
                    self._busy = False
