"""Text descriptions in the running node, over real DDS: /malmm/description, its counts in
/diagnostics, run-time text parameters, and /malmm/actions keeping its rate while a slow LLM
writes.

The LLMs are tiny random Llamas written here (malmm_ros.model.tiny_llm) and loaded by the node
through text.model_path like any local model folder. The slow one is wide, deep and never
picks end-of-text, so each description really takes seconds of compute.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from node_helpers.frames import photo
from node_helpers.ros_driver import (
    RELIABLE,
    CameraStream,
    NodeSession,
    raw_image,
    running_session,
    stamp_ns_of,
)
from std_msgs.msg import String

from malmm_ros.config import AnticipateConfig
from malmm_ros.data.labels import LabelMaps
from malmm_ros.model.checkpoint import save_checkpoint
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.model.text import DESCRIPTION_SCHEMA, TextProjector
from malmm_ros.model.tiny_llm import write_tiny_llm

DOMAIN_ID = 212  # the node with a quick LLM
SLOW_DOMAIN_ID = 213  # the node with a slow LLM
MAX_NEW_TOKENS = 8
SLOW_TOKENS = 300
CAMERA_HZ = 8.0
STREAM_S = 12.0
KEYS = {'schema', 'stamp', 'frame_id', 'text', 'num_tokens', 'latency_ms', 'model', 'trained'}


@pytest.fixture(scope='module')
def llm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp('llms')


@pytest.fixture(scope='module')
def quick_llm(llm_root: Path) -> Path:
    return write_tiny_llm(llm_root / 'quick-llama', hidden_size=64, num_layers=2)


@pytest.fixture(scope='module')
def slow_llm(llm_root: Path) -> Path:
    return write_tiny_llm(llm_root / 'slow-llama', hidden_size=384, num_layers=6,
                          endless=True)


def _frame(stamp: int, index: int = 0, frame_id: str = 'text_cam'):
    return raw_image('rgb8', 160, 120, 480, photo(120, 160, index).tobytes(), stamp,
                     frame_id=frame_id)


def _subscribe_descriptions(session: NodeSession):
    return session.driver.subscribe(String, '/malmm/description', RELIABLE,
                                    convert=lambda m: json.loads(m.data))[1]


def _text_values(status: dict) -> dict[str, int]:
    keys = ('text_requested', 'text_published', 'text_dropped_busy', 'text_failed')
    return {key: int(status['values'][key]) for key in keys}


# -- a quick LLM ------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def session(tmp_path_factory: pytest.TempPathFactory, quick_llm: Path
            ) -> Iterator[NodeSession]:
    params = ['sample_fps:=0.0', 'text.enabled:=true', f'text.model_path:={quick_llm}',
              'text.every_n_predictions:=1', f'text.max_new_tokens:={MAX_NEW_TOKENS}']
    yield from running_session(DOMAIN_ID, params, log_dir=tmp_path_factory.mktemp('text_node'))


@pytest.fixture(scope='module')
def descriptions(session: NodeSession):
    inbox = _subscribe_descriptions(session)
    session.wait_until(lambda: session.driver.node.count_publishers('/malmm/description') >= 1,
                       'the node to publish /malmm/description')
    return inbox


def _description_for(descriptions, stamp: int) -> dict | None:
    for item in descriptions.items():
        if stamp_ns_of(item['stamp']) == stamp:
            return item
    return None


def _describe(session: NodeSession, descriptions, index: int = 0) -> tuple[int, dict]:
    """Send frames until one of them is described: (stamp, description)."""
    return session.roundtrip(lambda stamp: _frame(stamp, index),
                             lambda stamp: _description_for(descriptions, stamp),
                             'a description of a frame sent')


def test_description_published_with_the_schema(session: NodeSession, descriptions) -> None:
    stamp, description = _describe(session, descriptions)
    assert set(description) == KEYS
    assert description['schema'] == DESCRIPTION_SCHEMA
    assert description['frame_id'] == 'text_cam'
    assert isinstance(description['text'], str)
    assert 0 <= description['num_tokens'] <= MAX_NEW_TOKENS
    assert description['latency_ms'] > 0
    assert description['model'] == 'quick-llama'
    assert description['trained'] is False  # no checkpoint, no trained projector
    # It describes the frame of a published prediction.
    session.wait_until(lambda: session.prediction_for(stamp), 'the prediction of that frame')


def test_descriptions_are_counted_in_diagnostics(session: NodeSession, descriptions) -> None:
    _describe(session, descriptions, 1)
    status = session.fresh_diagnostics()
    values = status['values']
    counts = _text_values(status)
    assert counts['text_published'] >= 1 and counts['text_failed'] == 0
    busy = values['text_busy'] == 'True'
    assert counts['text_requested'] == (counts['text_published'] + counts['text_dropped_busy']
                                        + int(busy))
    assert values['text_model'] == 'quick-llama' and values['text_trained'] == 'False'
    assert float(values['text_latency_p50_ms']) > 0
    assert float(values['text_latency_last_ms']) > 0


def test_text_options_change_at_run_time(session: NodeSession, descriptions) -> None:
    [result] = session.set_parameters(text__max_new_tokens=2)
    assert result.successful, result.reason
    try:
        _, description = _describe(session, descriptions, 2)
        assert description['num_tokens'] <= 2
    finally:
        session.set_parameters(text__max_new_tokens=MAX_NEW_TOKENS)


def test_bad_model_path_at_run_time_is_refused(session: NodeSession, descriptions,
                                               tmp_path: Path) -> None:
    missing = tmp_path / 'no-model-here'
    [result] = session.set_parameters(text__model_path=str(missing))
    assert not result.successful
    assert str(missing) in result.reason and 'does not exist' in result.reason
    assert session.get_parameters('text.model_path')['text.model_path'] != str(missing)
    _describe(session, descriptions, 3)  # the describer it had still works


def test_text_can_be_switched_off_and_on(session: NodeSession, descriptions) -> None:
    [result] = session.set_parameters(text__enabled=False)
    assert result.successful, result.reason
    try:
        stamp, _ = session.predict(lambda s: _frame(s, 4))
        time.sleep(1.0)  # a description would take milliseconds
        assert _description_for(descriptions, stamp) is None
        session.fresh_diagnostics()
        assert 'text_requested' not in session.latest_diagnostics()['values']
    finally:
        [result] = session.set_parameters(text__enabled=True)
    assert result.successful, result.reason
    _describe(session, descriptions, 5)


# -- a slow LLM -------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory, slow_llm: Path) -> Path:
    """An edge checkpoint carrying a projector for the slow LLM (random values, 'trained')."""
    config = AnticipateConfig().model
    torch.manual_seed(0)
    model = MalmmModel(config, LabelMaps.placeholder())
    projector = TextProjector(config.hidden_size, 384, llm_name=slow_llm.name)
    path = tmp_path_factory.mktemp('ckpt') / 'with_text.safetensors'
    save_checkpoint(path, model, text_projector=projector)
    return path


@pytest.fixture(scope='module')
def slow_session(tmp_path_factory: pytest.TempPathFactory, slow_llm: Path,
                 trained_checkpoint: Path) -> Iterator[NodeSession]:
    params = ['sample_fps:=0.0', f'checkpoint:={trained_checkpoint}', 'text.enabled:=true',
              f'text.model_path:={slow_llm}', 'text.every_n_predictions:=1',
              f'text.max_new_tokens:={SLOW_TOKENS}']
    yield from running_session(SLOW_DOMAIN_ID, params,
                               log_dir=tmp_path_factory.mktemp('slow_text_node'))


def test_actions_keep_their_rate_while_a_slow_llm_writes(slow_session: NodeSession,
                                                         tmp_path: Path) -> None:
    session = slow_session
    descriptions = _subscribe_descriptions(session)
    _, arrivals = session.driver.subscribe(  # (receive time, frame_id) of each prediction
        String, '/malmm/actions', RELIABLE,
        convert=lambda m: (time.monotonic(), json.loads(m.data)['frame_id']))
    session.predict(lambda stamp: _frame(stamp, 0, 'warmup'), 'a first prediction')
    before = _text_values(session.fresh_diagnostics())
    with CameraStream(SLOW_DOMAIN_ID, log_dir=tmp_path, width=320, height=240, rate=CAMERA_HZ,
                      seconds=STREAM_S, start_ns=session.clock.next(),
                      frame_id='steady_cam') as camera:
        camera.proc.wait(timeout=STREAM_S + 60)  # it stops by itself after STREAM_S
        result = camera.stop()
    session.clock.last_ns = max(session.clock.last_ns, result['last_stamp_ns'] or 0)
    time.sleep(1.0)
    status = session.wait_diagnostics(lambda d: True, 'diagnostics after the stream',
                                      newer_than_ns=time.time_ns())
    sent = result['sent']
    actions = [p for p in session.actions.items() if p['frame_id'] == 'steady_cam']
    described = [d for d in descriptions.items() if d['frame_id'] == 'steady_cam']
    after = _text_values(status)
    latency_ms = float(status['values']['text_latency_p50_ms'])
    times = [t for t, frame_id in arrivals.items() if frame_id == 'steady_cam']
    summary = (f'sent {sent}, predictions {len(actions)}, descriptions {len(described)}, '
               f'text latency p50 {latency_ms:.0f} ms, counts {after}')
    assert sent >= CAMERA_HZ * STREAM_S * 0.8, summary  # the camera itself kept its rate
    # Each description took many frame periods: inline generation would have cut the rate.
    assert latency_ms > 5 * 1000.0 / CAMERA_HZ, summary
    # Yet nearly every frame got its prediction, and they kept coming at the camera's rate:
    # no gap of more than a few frame periods while the LLM wrote.
    assert len(actions) >= 0.9 * sent, summary
    rate = (len(times) - 1) / (times[-1] - times[0])
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert rate >= 0.85 * CAMERA_HZ, f'{rate:.2f} Hz; {summary}'
    assert max(gaps) < 4.0 / CAMERA_HZ, f'longest gap {max(gaps):.2f} s; {summary}'
    # Requests that came while the LLM was busy were dropped and counted, not queued.
    assert after['text_dropped_busy'] - before['text_dropped_busy'] >= 0.5 * sent
    assert after['text_failed'] == 0
    assert described, 'no description of the stream was published'
    assert all(d['num_tokens'] == SLOW_TOKENS and d['trained'] is True for d in described)
    for description in described:  # each describes a frame that got a prediction
        assert session.prediction_for(stamp_ns_of(description['stamp'])) is not None


def test_sigint_during_a_slow_description_exits_at_once(slow_session: NodeSession) -> None:
    session = slow_session
    session.predict(lambda stamp: _frame(stamp, 1, 'last'), 'a prediction to describe')
    session.wait_until(lambda: session.latest_diagnostics()['values'].get('text_busy') == 'True',
                       'the describer to be busy', timeout=30)
    start = time.monotonic()
    code = session.process.stop(signal.SIGINT, timeout=30)
    elapsed = time.monotonic() - start
    assert code == 0, session.process.describe()
    assert elapsed < 10.0
    assert 'Traceback' not in session.process.stderr()
