"""The keep-latest handoff between the image callback and the inference thread.

Waits are asserted as events (a take that must return on its own does so on a thread that
ends), never as durations: WAIT_S only bounds how long a test waits for such a thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from malmm_ros.ros.latest_slot import LatestSlot

WAIT_S = 60.0  # generous: the machine has 2 cores and may be busy with other work


def _returns(call: Callable[[], object]) -> object:
    """call() on a thread of its own; its result, or a failure if it is still blocked after
    WAIT_S (so a take that waits for a put that never comes fails instead of hanging)."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(timeout=WAIT_S)
    assert not thread.is_alive(), f'still blocked after {WAIT_S} s'
    return result[0]


def test_new_slot_is_empty() -> None:
    slot = LatestSlot()
    assert slot.dropped == 0
    assert slot.take(timeout=0) is None


def test_put_then_take_returns_the_item_once() -> None:
    slot = LatestSlot()
    item = object()
    assert slot.put(item) is False
    assert slot.take(timeout=0) is item
    assert slot.take(timeout=0) is None
    assert slot.dropped == 0


def test_take_returns_the_newest_and_counts_every_overwrite() -> None:
    slot = LatestSlot()
    results = [slot.put(i) for i in range(5)]
    assert results == [False, True, True, True, True]
    assert slot.dropped == 4
    assert slot.take(timeout=0) == 4
    assert slot.take(timeout=0) is None


def test_put_after_a_take_is_not_a_drop() -> None:
    slot = LatestSlot()
    slot.put('a')
    assert slot.take(timeout=0) == 'a'
    assert slot.put('b') is False
    assert slot.dropped == 0
    assert slot.take(timeout=0) == 'b'


@pytest.mark.parametrize('item', [0, '', False, [], 0.0], ids=repr)
def test_falsy_items_are_delivered(item: object) -> None:
    slot = LatestSlot()
    slot.put(item)
    assert slot.take(timeout=0) == item
    assert slot.put('next') is False  # the falsy item was really taken


@pytest.mark.parametrize('timeout', [0.05, 0.2])
def test_take_on_empty_waits_for_the_timeout(timeout: float) -> None:
    slot = LatestSlot()
    start = time.monotonic()
    assert _returns(lambda: slot.take(timeout=timeout)) is None
    # A lower bound only: a loaded machine makes the wait longer, never shorter.
    assert time.monotonic() - start >= timeout * 0.9


def test_take_with_zero_timeout_returns_without_a_put() -> None:
    slot = LatestSlot()
    assert _returns(lambda: slot.take(timeout=0)) is None


def test_take_with_an_item_waiting_returns_it_without_waiting_for_a_put() -> None:
    slot = LatestSlot()
    slot.put(7)
    # No timeout: a take that waited for a notification instead of seeing the item would block.
    assert _returns(lambda: slot.take(timeout=None)) == 7


@pytest.mark.parametrize('timeout', [None, 3600.0])
def test_blocked_take_wakes_on_put(timeout: float | None) -> None:
    slot = LatestSlot()
    got: list[object] = []
    consumer = threading.Thread(target=lambda: got.append(slot.take(timeout=timeout)),
                                daemon=True)
    consumer.start()
    time.sleep(0.05)
    assert got == []  # still waiting
    slot.put('frame')
    # Ending long before its own timeout (an hour, or never) means the put woke it.
    consumer.join(timeout=WAIT_S)
    assert not consumer.is_alive()
    assert got == ['frame']


def test_clear_drops_without_counting() -> None:
    slot = LatestSlot()
    slot.put('stale')
    slot.clear()
    assert slot.dropped == 0
    assert slot.take(timeout=0) is None
    assert slot.put('fresh') is False  # the cleared slot is empty, nothing replaced
    assert slot.dropped == 0
    assert slot.take(timeout=0) == 'fresh'


def test_put_after_clear_is_not_a_drop() -> None:
    slot = LatestSlot()
    slot.put('stale')
    slot.clear()
    assert slot.put('fresh') is False
    assert slot.dropped == 0
    assert slot.take(timeout=0) == 'fresh'


def test_take_after_clear_waits_like_an_empty_slot() -> None:
    slot = LatestSlot()
    slot.put('stale')
    slot.clear()
    start = time.monotonic()
    assert _returns(lambda: slot.take(timeout=0.1)) is None
    assert time.monotonic() - start >= 0.09  # it waited (a lower bound: load only adds)


def test_clear_on_empty_slot_is_harmless() -> None:
    slot = LatestSlot()
    slot.clear()
    slot.clear()
    assert slot.dropped == 0
    assert slot.take(timeout=0) is None


def test_drops_accumulate_across_takes() -> None:
    slot = LatestSlot()
    for round_ in range(3):
        slot.put((round_, 0))
        slot.put((round_, 1))
        assert slot.take(timeout=0) == (round_, 1)
    assert slot.dropped == 3


def test_producer_consumer_stress() -> None:
    produced = 10_000
    slot = LatestSlot()
    taken: list[int] = []
    drops_reported = 0
    done = threading.Event()
    failures: list[Exception] = []

    def producer() -> None:
        nonlocal drops_reported
        try:
            for i in range(produced):
                drops_reported += slot.put(i)
        except Exception as exc:  # reported through `failures`
            failures.append(exc)
        finally:
            done.set()

    def consumer() -> None:
        try:
            while True:
                item = slot.take(timeout=0.01)
                if item is None:
                    if done.is_set():
                        return
                    continue
                taken.append(item)
                time.sleep(0.0002)  # slower than the producer
        except Exception as exc:
            failures.append(exc)

    threads = [threading.Thread(target=consumer, daemon=True),
               threading.Thread(target=producer, daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=WAIT_S)
    assert not any(thread.is_alive() for thread in threads), 'deadlock: a thread never ended'
    assert failures == []

    while (item := slot.take(timeout=0)) is not None:  # drain what the consumer left
        taken.append(item)

    assert taken, 'the consumer got nothing'
    assert all(a < b for a, b in zip(taken, taken[1:], strict=False)), 'items out of order'
    assert taken[-1] == produced - 1, 'the newest item was lost'
    assert len(taken) + slot.dropped == produced
    assert drops_reported == slot.dropped
    assert slot.dropped > 0, 'a slow consumer must cause drops'
