"""The keep-latest handoff between the image callback and the inference thread."""

from __future__ import annotations

import threading
import time

import pytest

from malmm_ros.ros.latest_slot import LatestSlot


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
    assert slot.take(timeout=timeout) is None
    elapsed = time.monotonic() - start
    assert timeout * 0.9 <= elapsed < timeout + 1.0


def test_take_with_zero_timeout_does_not_wait() -> None:
    slot = LatestSlot()
    start = time.monotonic()
    assert slot.take(timeout=0) is None
    assert time.monotonic() - start < 0.05


def test_take_with_an_item_waiting_returns_at_once() -> None:
    slot = LatestSlot()
    slot.put(7)
    start = time.monotonic()
    assert slot.take(timeout=5.0) == 7
    assert time.monotonic() - start < 0.5


@pytest.mark.parametrize('timeout', [None, 5.0])
def test_blocked_take_wakes_on_put(timeout: float | None) -> None:
    slot = LatestSlot()
    got: list[object] = []
    consumer = threading.Thread(target=lambda: got.append(slot.take(timeout=timeout)))
    consumer.start()
    time.sleep(0.05)
    assert got == []  # still waiting
    start = time.monotonic()
    slot.put('frame')
    consumer.join(timeout=5.0)
    assert not consumer.is_alive()
    assert got == ['frame']
    assert time.monotonic() - start < 1.0


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
    assert slot.take(timeout=0.1) is None
    assert time.monotonic() - start >= 0.09


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
        thread.join(timeout=30.0)
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
