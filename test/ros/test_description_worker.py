"""The describer's thread (malmm_ros.ros.description_worker) with a real tiny LLM: one
description at a time, drops counted while busy, failures survived, prompt shutdown."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from malmm_ros.model.text import Description, GenerationOptions, TextDescriber
from malmm_ros.model.tiny_llm import write_tiny_llm
from malmm_ros.ros.description_worker import NICE, DescriptionWorker

WIDTH = 16
WAIT_S = 60.0  # bounds every wait for an event; generous, the machine may be busy


@pytest.fixture(scope='module')
def describer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TextDescriber]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Endless and wide enough that 400 tokens take a good fraction of a second or more.
    folder = write_tiny_llm(tmp_path_factory.mktemp('llm') / 'endless', hidden_size=128,
                            num_layers=3, endless=True)
    yield TextDescriber.load(folder, WIDTH, options=GenerationOptions(max_new_tokens=400))
    torch.set_num_threads(threads)


class Sink:
    """Collects published descriptions and reported errors."""

    def __init__(self) -> None:
        self.published: list[Description] = []
        self.errors: list[BaseException] = []
        self.event = threading.Event()

    def publish(self, description: Description) -> None:
        self.published.append(description)
        self.event.set()

    def error(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.event.set()


def _queries(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, WIDTH, generator=torch.Generator().manual_seed(seed))


def _wait(condition, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.01)


def test_one_at_a_time_and_drops_counted(describer: TextDescriber) -> None:
    sink = Sink()
    worker = DescriptionWorker(describer, sink.publish, sink.error)
    try:
        assert worker.submit(_queries(0), 111, 'cam')
        assert worker.busy
        assert not worker.submit(_queries(1), 222, 'cam')  # busy: dropped, not queued
        assert not worker.submit(_queries(2), 333, 'cam')
        _wait(lambda: not worker.busy)
        assert [d.stamp_ns for d in sink.published] == [111]
        assert sink.published[0].num_tokens == 400 and sink.published[0].frame_id == 'cam'
        values = worker.values()
        assert (values['text_requested'], values['text_published'],
                values['text_dropped_busy'], values['text_failed']) == (3, 1, 2, 0)
        assert float(values['text_latency_last_ms']) == pytest.approx(
            sink.published[0].latency_ms, abs=0.1)
        assert worker.submit(_queries(3), 444)  # free again
        _wait(lambda: len(sink.published) == 2)
    finally:
        worker.stop()


def test_failure_is_counted_and_survived(describer: TextDescriber) -> None:
    sink = Sink()
    worker = DescriptionWorker(describer, sink.publish, sink.error)
    try:
        assert worker.submit(torch.zeros(2, 4, WIDTH), 1)  # a batch: generate refuses it
        _wait(lambda: sink.errors and not worker.busy)
        assert isinstance(sink.errors[0], ValueError)
        assert worker.values()['text_failed'] == 1
        assert worker.submit(_queries(4), 2)
        _wait(lambda: sink.published)
        assert worker.values()['text_published'] == 1
    finally:
        worker.stop()


def test_no_describer_no_request(describer: TextDescriber) -> None:
    sink = Sink()
    worker = DescriptionWorker(None, sink.publish)
    try:
        assert not worker.submit(_queries(5), 1)
        assert worker.values()['text_requested'] == 0
        worker.describer = describer  # switched on at run time
        assert worker.submit(_queries(5), 2)
        _wait(lambda: sink.published)
    finally:
        worker.stop()


def test_stop_abandons_a_long_description_within_a_token(describer: TextDescriber) -> None:
    """Counted in LLM forward passes (one per token), not in seconds."""
    sink = Sink()
    slow = TextDescriber(describer.llm, describer.tokenizer, describer.projector,
                         name=describer.name, options=GenerationOptions(max_new_tokens=1000),
                         trained=False)
    forwards = 0
    generating = threading.Event()

    def count_forward(*_: object) -> None:
        nonlocal forwards
        forwards += 1
        if forwards >= 3:  # the prompt and two tokens: well into the generation
            generating.set()

    hook = describer.llm.register_forward_hook(count_forward)
    try:
        worker = DescriptionWorker(slow, sink.publish, sink.error)
        assert worker.submit(_queries(6), 1)
        assert generating.wait(WAIT_S), 'the generation never started'
        at_stop = forwards
        worker.stop(timeout=WAIT_S)
        assert not worker._thread.is_alive()
        # The step running when stop() came may finish, and one more may start before the
        # stopping check; the other ~1000 never run.
        assert forwards - at_stop <= 2, f'{forwards - at_stop} tokens after stop()'
        assert sink.published == [] and sink.errors == []
    finally:
        hook.remove()


@pytest.mark.skipif(not hasattr(os, 'getpriority'), reason='no thread priorities here')
def test_thread_runs_at_a_lower_priority(describer: TextDescriber) -> None:
    worker = DescriptionWorker(describer, Sink().publish)
    try:
        base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        tid = worker._thread.native_id
        _wait(lambda: os.getpriority(os.PRIO_PROCESS, tid) != base)
        assert os.getpriority(os.PRIO_PROCESS, tid) == min(19, base + NICE)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    finally:
        worker.stop()
