"""The node's outputs and controls over DDS: malmm/actions (stamp, frame_id, v1 JSON),
malmm/labels to a late subscriber, /diagnostics, the ~/reset service, a stamp going backwards,
run-time parameter changes (refused and accepted) and malmm/overlay only while subscribed.

One malmm_anticipate process serves the module: every frame is processed (sample_fps 0) and
predicted on (publish_every_n 1); the camera subscription is reliable here (the other modules
use the default best effort), so frames sent one at a time are never lost. The tests run in file
order; each one leaves the node as it found it (parameters restored).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticStatus
from sensor_msgs.msg import Image
from std_msgs.msg import String

from support.domains import domain_id
from support.frames import photo
from support.ros_driver import (
    LATCHED,
    NODE_NAME,
    RELIABLE,
    NodeSession,
    raw_image,
    running_session,
    stamp_ns_of,
)

DOMAIN_ID = domain_id(__file__)
M = 4
PARAMS = ['sample_fps:=0.0', 'publish_every_n:=1', f'memory_bank_length:={M}',
          'qos.reliability:=reliable', 'qos.depth:=5', 'stale_after_s:=2.0']
HEIGHT, WIDTH = 120, 160
OK, WARN, ERROR = (int.from_bytes(level, 'little') for level in (
    DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR))
STATUS_KEYS = {'input_rate_hz', 'processed_rate_hz', 'frames_in', 'processed', 'predictions',
               'dropped', 'bad_frames', 'resets', 'step_latency_p50_ms', 'step_latency_p95_ms',
               'memory_slots', 'backend', 'device', 'trained'}


@pytest.fixture(scope='module')
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeSession]:
    yield from running_session(DOMAIN_ID, PARAMS, log_dir=tmp_path_factory.mktemp('stream_node'))


def frame(index: int = 0, frame_id: str = 'test_camera'):
    rgb = photo(HEIGHT, WIDTH, index)
    return lambda stamp: raw_image('rgb8', WIDTH, HEIGHT, WIDTH * 3, rgb.tobytes(), stamp,
                                   frame_id=frame_id)


# -- diagnostics before any frame ------------------------------------------------------------

def test_diagnostics_report_error_before_the_first_frame(session: NodeSession) -> None:
    status = session.wait_diagnostics(lambda d: d['level'] == ERROR,
                                      'an ERROR status while no frame has arrived')
    assert 'no frame' in status['message']
    assert status['name'].startswith(f'{NODE_NAME}:')
    values = status['values']
    assert STATUS_KEYS <= set(values), STATUS_KEYS - set(values)
    assert values['frames_in'] == '0' and values['processed'] == '0'
    assert values['step_latency_p50_ms'] == 'n/a'
    assert values['trained'] == 'False'
    assert values['device'] == 'cpu'
    assert values['backend'] and values['memory_slots'] == '0'


# -- malmm/actions ---------------------------------------------------------------------------

def _check_scores(entries: list[dict], keys: set[str]) -> None:
    assert len(entries) == 5
    for entry in entries:
        assert keys <= set(entry)
        assert 0.0 <= entry['score'] <= 1.0
    scores = [entry['score'] for entry in entries]
    assert scores == sorted(scores, reverse=True)


def test_actions_carry_the_stamp_and_frame_id_of_the_newest_frame(session: NodeSession) -> None:
    seen = []
    for i, frame_id in enumerate(['kitchen_cam', 'camera_optical_frame', 'x/y']):
        stamp, prediction = session.predict(frame(i, frame_id), f'a prediction for {frame_id}')
        assert prediction['stamp'] == {'sec': stamp // 10**9, 'nanosec': stamp % 10**9}
        assert stamp % 10**9 != 0  # a real nanosecond part went through
        assert prediction['frame_id'] == frame_id
        seen.append(prediction['frames_seen'])

        assert prediction['schema'] == 'malmm_ros/actions/v1'
        assert 1 <= prediction['memory_slots'] <= M
        _check_scores(prediction['verb'], {'id', 'name', 'score'})
        _check_scores(prediction['noun'], {'id', 'name', 'score'})
        _check_scores(prediction['action'], {'id', 'verb_id', 'noun_id', 'name', 'score'})
        for action in prediction['action']:
            assert action['id'] == action['verb_id'] * 1000 + action['noun_id']
        assert {'encoder', 'memory', 'heads', 'total'} <= set(prediction['latency_ms'])
        assert prediction['model']['trained'] is False
        assert prediction['model']['checkpoint'] == ''
        assert prediction['model']['name']
    assert seen == list(range(seen[0], seen[0] + 3))  # one more frame in memory each time


def test_diagnostics_while_frames_flow(session: NodeSession) -> None:
    for i in range(3):
        session.predict(frame(i))
    after_ns = time.time_ns()
    status = None
    for i in range(1000):  # frames keep flowing until a status published after those is in
        status = next((d for d in session.diagnostics.items() if d['stamp_ns'] > after_ns),
                      None)
        if status is not None:
            break
        session.predict(frame(i))
    assert status is not None
    values = status['values']
    # Untrained heads: WARN (frames arrive, none is dropped).
    assert status['level'] == WARN, status
    assert 'untrained' in status['message']
    assert int(values['frames_in']) >= 3
    assert int(values['processed']) >= 3
    assert int(values['predictions']) >= 3
    assert values['dropped'] == '0' and values['bad_frames'] == '0'
    # At most M (the node reports the count after each step).
    assert 1 <= int(values['memory_slots']) <= M
    p50, p95 = float(values['step_latency_p50_ms']), float(values['step_latency_p95_ms'])
    assert 0 < p50 <= p95
    assert float(values['input_rate_hz']) >= 0 and float(values['processed_rate_hz']) >= 0


# -- malmm/labels ----------------------------------------------------------------------------

def test_labels_reach_a_late_subscriber(session: NodeSession) -> None:
    # The node published its labels once, at start, before this subscription existed.
    subscription, inbox = session.driver.subscribe(String, '/malmm/labels', LATCHED,
                                                   convert=lambda m: json.loads(m.data))
    try:
        labels = session.wait_until(lambda: inbox.items(), 'malmm/labels')[0]
    finally:
        session.driver.node.destroy_subscription(subscription)
    assert labels['schema'] == 'malmm_ros/labels/v1'
    assert labels['trained'] is False
    assert isinstance(labels['actions'], list)
    assert labels['verbs'] and labels['nouns']
    verbs = {v['id']: v['name'] for v in labels['verbs']}
    nouns = {n['id']: n['name'] for n in labels['nouns']}
    # Predictions name their classes as the labels do.
    _, prediction = session.predict(frame(1))
    for verb in prediction['verb']:
        assert verbs[verb['id']] == verb['name']
    for noun in prediction['noun']:
        assert nouns[noun['id']] == noun['name']


# -- ~/reset and a stamp going backwards -------------------------------------------------------

def test_reset_service_clears_the_memory(session: NodeSession) -> None:
    for i in range(3):
        _, prediction = session.predict(frame(i))
    assert prediction['frames_seen'] >= 3
    response = session.reset()
    assert response.success is True
    assert response.message
    _, prediction = session.predict(frame(4), 'the first prediction after the reset')
    assert prediction['frames_seen'] == 1
    assert prediction['memory_slots'] == 1
    _, prediction = session.predict(frame(5))
    assert prediction['frames_seen'] == 2


def test_stamp_going_backwards_resets_the_memory(session: NodeSession) -> None:
    for i in range(3):
        session.predict(frame(i))
    resets = int(session.fresh_diagnostics()['values']['resets'])
    _, before = session.predict(frame(3))
    assert before['frames_seen'] >= 4

    back = session.clock.last_ns - 5 * 10**9 - 777  # as a looping bag does (a stamp not sent yet)

    def older() -> int:
        return back

    stamp, prediction = session.predict(frame(4), 'a prediction for the older stamp',
                                        stamps=older)
    assert stamp == back
    assert prediction['frames_seen'] == 1
    assert prediction['memory_slots'] == 1
    status = session.wait_diagnostics(lambda d: int(d['values']['resets']) > resets,
                                      f'resets above {resets}')
    assert int(status['values']['resets']) == resets + 1
    _, prediction = session.predict(frame(5), 'a prediction after the reset')
    assert prediction['frames_seen'] == 2


# -- run-time parameters -----------------------------------------------------------------------

REFUSED = [
    # name, value, a fragment the reason must contain ('' for any non-empty reason)
    ('memory_bank_length', 0, 'memory_bank_length'),  # out of range
    ('memory_bank_length', 'twenty', ''),  # wrong type
    ('publish_every_n', 2.5, ''),  # wrong type
    ('sample_fps', 5000.0, 'sample_fps'),  # out of range
    ('backend', 'nope', 'backend'),  # not a choice
    ('device', 'gpu', 'device'),  # not a choice
    ('model.num_heads', 3, 'num_heads'),  # hidden_size 256 is not divisible by 3
    ('qos.depth', 7, 'qos.depth'),  # read only: needs a new subscription
    ('qos.reliability', 'best_effort', 'qos.reliability'),  # read only
    ('input_transport', 'compressed', 'input_transport'),  # read only
    # valid values whose new pipeline cannot be built: refused, the running one kept
    ('checkpoint', '/nonexistent/malmm.safetensors', '/nonexistent/malmm.safetensors'),
    ('labels.verb_classes', '/nonexistent/verbs.csv', '/nonexistent/verbs.csv'),
]


@pytest.mark.parametrize(('name', 'value', 'fragment'), REFUSED,
                         ids=[f'{n}={v!r}' for n, v, _ in REFUSED])
def test_runtime_parameter_change_is_refused_with_a_reason(session: NodeSession, name: str,
                                                           value: object,
                                                           fragment: str) -> None:
    old = session.get_parameters(name)[name]
    _, before = session.predict(frame(1))
    [result] = session.set_parameters(**{name.replace('.', '__'): value})
    assert result.successful is False
    assert result.reason, 'a refusal must say why'
    assert fragment in result.reason, result.reason
    assert session.get_parameters(name)[name] == old
    # The node runs on, unchanged: same pipeline, same memory.
    _, prediction = session.predict(frame(2), f'a prediction after refusing {name}')
    assert prediction['frames_seen'] == before['frames_seen'] + 1
    assert 1 <= prediction['memory_slots'] <= M


@pytest.fixture
def overlay(session: NodeSession) -> Iterator:
    """A malmm/overlay subscription that has already received one frame: from then on every
    processed frame shows up there, predicted or not."""
    subscription, inbox = session.driver.subscribe(Image, '/malmm/overlay', RELIABLE)
    try:
        session.roundtrip(frame(0), lambda s: _overlay_for(inbox, s), 'a first overlay',
                          resend_s=1.0)
        yield inbox
    finally:
        session.driver.node.destroy_subscription(subscription)


def _overlay_for(inbox, stamp: int) -> Image | None:
    return next((m for m in inbox.items() if stamp_ns_of(m.header.stamp) == stamp), None)


def test_publish_every_n_accepted_at_run_time(session: NodeSession, overlay) -> None:
    [result] = session.set_parameters(publish_every_n=2)
    try:
        assert result.successful is True, result.reason
        assert session.get_parameters('publish_every_n') == {'publish_every_n': 2}
        stamps = []
        for i in range(6):  # each frame confirmed processed by its overlay
            stamp, _ = session.roundtrip(frame(i), lambda s: _overlay_for(overlay, s),
                                         f'the overlay of frame {i}')
            stamps.append(stamp)
        session.wait_until(lambda: session.prediction_for(stamps[-1]), 'the last prediction')
        predicted = [s for s in stamps if session.prediction_for(s)]
        assert predicted == stamps[1::2], 'a prediction every 2nd processed frame'
        seen = [session.prediction_for(s)['frames_seen'] for s in predicted]
        assert np.diff(seen).tolist() == [2, 2]
    finally:
        [result] = session.set_parameters(publish_every_n=1)
        assert result.successful is True, result.reason


def test_max_image_side_accepted_at_run_time(session: NodeSession) -> None:
    """A live setting: takes effect on the next frame, memory kept."""
    _, before = session.predict(frame(0))
    bad_frames = int(session.fresh_diagnostics()['values']['bad_frames'])
    [result] = session.set_parameters(max_image_side=WIDTH - 1)
    try:
        assert result.successful is True, result.reason
        session.roundtrip(
            frame(1), lambda _: next((d for d in session.diagnostics.items()
                                      if int(d['values']['bad_frames']) > bad_frames), None),
            f'a {WIDTH}x{HEIGHT} frame to be refused with max_image_side {WIDTH - 1}')
    finally:
        [result] = session.set_parameters(max_image_side=4096)
        assert result.successful is True, result.reason
    _, prediction = session.predict(frame(2))
    assert prediction['frames_seen'] == before['frames_seen'] + 1


def test_model_change_rebuilds_the_pipeline(session: NodeSession) -> None:
    smaller = M - 1
    [result] = session.set_parameters(memory_bank_length=smaller)
    try:
        assert result.successful is True, result.reason
        assert session.get_parameters('memory_bank_length') == {'memory_bank_length': smaller}
        predictions = [session.predict(frame(i))[1] for i in range(smaller + 2)]
        assert predictions[0]['frames_seen'] == 1, 'a new pipeline starts with an empty memory'
        assert [p['memory_slots'] for p in predictions] == [1, 2, 3, 3, 3][:len(predictions)]
    finally:
        [result] = session.set_parameters(memory_bank_length=M)
        assert result.successful is True, result.reason
    _, prediction = session.predict(frame(0))
    assert prediction['frames_seen'] == 1


# -- malmm/overlay -----------------------------------------------------------------------------

def _overlay_subscribers(session: NodeSession) -> int:
    return session.driver.node.count_subscribers('/malmm/overlay')


def test_overlay_is_published_only_while_subscribed(session: NodeSession) -> None:
    node = session.driver.node
    session.wait_until(lambda: node.count_publishers('/malmm/overlay') == 1,
                       'the node\'s overlay publisher')
    session.wait_until(lambda: _overlay_subscribers(session) == 0, 'no overlay subscriber')

    # Subscribed: overlays come, one per processed frame, with the frame's header.
    subscription, first = session.driver.subscribe(Image, '/malmm/overlay', RELIABLE)
    try:
        stamp, msg = session.roundtrip(frame(1, 'overlay_cam'), lambda s: _overlay_for(first, s),
                                       'an overlay while subscribed', resend_s=1.0)
        assert (msg.width, msg.height, msg.encoding) == (WIDTH, HEIGHT, 'bgr8')
        assert msg.header.frame_id == 'overlay_cam'
        assert subscription.get_publisher_count() == 1
    finally:
        node.destroy_subscription(subscription)
    received_while_subscribed = len(first)
    session.wait_until(lambda: _overlay_subscribers(session) == 0, 'the subscription to go')

    # Unsubscribed: the node keeps predicting; nothing reaches the old inbox.
    unsubscribed = [session.predict(frame(i))[0] for i in range(3)]
    assert len(first) == received_while_subscribed

    # Subscribed again: only frames sent from now on come back.
    subscription, second = session.driver.subscribe(Image, '/malmm/overlay', RELIABLE)
    try:
        stamp, _ = session.roundtrip(frame(2), lambda s: _overlay_for(second, s),
                                     'an overlay after subscribing again', resend_s=1.0)
        stamps = {stamp_ns_of(m.header.stamp) for m in second.items()}
        assert not stamps & set(unsubscribed)
        assert min(stamps) > max(unsubscribed)
    finally:
        node.destroy_subscription(subscription)


# -- diagnostics after the frames stop ---------------------------------------------------------

def test_diagnostics_report_error_when_frames_stop(session: NodeSession) -> None:
    session.predict(frame(0))
    status = session.wait_diagnostics(lambda d: d['level'] == ERROR,
                                      'an ERROR status once frames stopped',
                                      newer_than_ns=session.fresh_diagnostics()['stamp_ns'])
    assert 'no frame' in status['message']
    assert int(status['values']['processed']) > 0
