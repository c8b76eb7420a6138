"""The managed (lifecycle) node, driven over DDS through its lifecycle services from this process.

One `malmm-anticipate --managed` process walks the states in file order: it comes up
unconfigured, configure loads the model, activate takes frames, deactivate stops taking them and
keeps the memory, activate continues the same stream, cleanup releases the model, a configure
that fails leaves it unconfigured and alive, shutdown finalizes it, Ctrl-C ends it with exit 0.
A second process starts with a parameter that cannot be declared: it stays up, unconfigured,
and says why configure fails.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from diagnostic_msgs.msg import DiagnosticStatus
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from std_msgs.msg import String

from support.domains import domain_ids
from support.frames import photo
from support.ros_driver import (
    LATCHED,
    NODE_NAME,
    NodeProcess,
    NodeSession,
    raw_image,
    wait_until,
)

MANAGED_DOMAIN, BAD_PARAMETER_DOMAIN = domain_ids(__file__)
M = 4
PARAMS = ['sample_fps:=0.0', 'publish_every_n:=1', f'memory_bank_length:={M}',
          'qos.reliability:=reliable', 'qos.depth:=5', 'stale_after_s:=1.0']
HEIGHT, WIDTH = 120, 160
ERROR = int.from_bytes(DiagnosticStatus.ERROR, 'little')


@pytest.fixture(scope='module')
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeSession]:
    session = NodeSession(MANAGED_DOMAIN, PARAMS, log_dir=tmp_path_factory.mktemp('managed'),
                          managed=True)
    try:
        yield session
    finally:
        session.close()


def frame(index: int = 0):
    rgb = photo(HEIGHT, WIDTH, index)
    return lambda stamp: raw_image('rgb8', WIDTH, HEIGHT, WIDTH * 3, rgb.tobytes(), stamp,
                                   frame_id='managed_camera')


def get_state(session: NodeSession) -> int:
    response = session.driver.call(GetState, f'/{NODE_NAME}/get_state', GetState.Request(),
                                   process=session.process)
    return response.current_state.id


def change_state(session: NodeSession, transition: int) -> bool:
    request = ChangeState.Request()
    request.transition.id = transition
    response = session.driver.call(ChangeState, f'/{NODE_NAME}/change_state', request,
                                   process=session.process)
    return response.success


def camera_subscribed(session: NodeSession) -> bool:
    return session.image_pub.get_subscription_count() >= 1


def diagnostics_after(session: NodeSession, start_ns: int) -> dict:
    return session.wait_diagnostics(lambda status: True, 'a /diagnostics message',
                                    newer_than_ns=start_ns)


def test_starts_unconfigured_with_nothing_loaded(session: NodeSession) -> None:
    assert get_state(session) == State.PRIMARY_STATE_UNCONFIGURED
    assert not camera_subscribed(session)
    assert session.actions_sub.get_publisher_count() == 0
    assert len(session.diagnostics) == 0  # /diagnostics starts with configure
    assert 'managed node: unconfigured' in session.process.stderr()


def test_configure_loads_the_model_and_stays_off_the_camera(session: NodeSession) -> None:
    assert change_state(session, Transition.TRANSITION_CONFIGURE)
    assert get_state(session) == State.PRIMARY_STATE_INACTIVE
    assert 'configured:' in session.process.stderr()
    labels_sub, labels = session.driver.subscribe(String, '/malmm/labels', LATCHED)
    session.wait_until(lambda: len(labels) >= 1, 'the latched labels')
    session.driver.node.destroy_subscription(labels_sub)
    # Inactive longer than stale_after_s: a node told not to take frames is not starved.
    start = time.time_ns()
    status = session.wait_diagnostics(lambda s: s['stamp_ns'] > start + 2_500_000_000,
                                      'diagnostics 2.5 s after configure', newer_than_ns=start)
    assert status['values']['lifecycle_state'] == 'inactive'
    assert status['level'] != ERROR, status
    assert not camera_subscribed(session)


def test_activate_takes_frames_and_predicts(session: NodeSession) -> None:
    assert change_state(session, Transition.TRANSITION_ACTIVATE)
    assert get_state(session) == State.PRIMARY_STATE_ACTIVE
    session.wait_until(lambda: camera_subscribed(session)
                       and session.actions_sub.get_publisher_count() >= 1,
                       'the camera subscription and the actions publisher')
    for index in range(2):
        session.predict(frame(index), resend_s=60.0)
    status = session.fresh_diagnostics()
    assert status['values']['lifecycle_state'] == 'active'
    assert int(status['values']['memory_slots']) == 2
    refused = session.set_parameters(qos__depth=3)[0]  # needs a new subscription
    assert not refused.successful and 'qos.depth' in refused.reason


def test_deactivate_stops_taking_frames_and_keeps_the_memory(session: NodeSession) -> None:
    before = session.fresh_diagnostics()['values']
    assert change_state(session, Transition.TRANSITION_DEACTIVATE)
    assert get_state(session) == State.PRIMARY_STATE_INACTIVE
    session.wait_until(lambda: not camera_subscribed(session), 'the camera unsubscribed')
    predictions = len(session.actions)
    for index in range(3):
        session.publish(frame(index)(session.clock.next()))
    start = time.time_ns()
    status = session.wait_diagnostics(lambda s: s['stamp_ns'] > start + 1_500_000_000,
                                      'diagnostics 1.5 s after the frames',
                                      newer_than_ns=start)['values']
    assert status['lifecycle_state'] == 'inactive'
    assert status['frames_in'] == before['frames_in']
    assert status['memory_slots'] == before['memory_slots'] == '2'
    assert len(session.actions) == predictions
    # Not subscribed: the camera QoS may change now and applies at the next activate.
    assert session.set_parameters(qos__depth=3)[0].successful


def test_activate_again_continues_the_same_stream(session: NodeSession) -> None:
    resets = session.fresh_diagnostics()['values']['resets']
    assert change_state(session, Transition.TRANSITION_ACTIVATE)
    session.wait_until(lambda: camera_subscribed(session), 'the camera subscribed again')
    session.predict(frame(5), resend_s=60.0)
    status = session.fresh_diagnostics()['values']
    assert status['memory_slots'] == '3'  # two from before deactivate, one now
    assert status['resets'] == resets


def test_cleanup_releases_the_model(session: NodeSession) -> None:
    assert change_state(session, Transition.TRANSITION_DEACTIVATE)
    assert change_state(session, Transition.TRANSITION_CLEANUP)
    assert get_state(session) == State.PRIMARY_STATE_UNCONFIGURED
    assert 'cleaned up: model released' in session.process.stderr()
    session.wait_until(lambda: session.actions_sub.get_publisher_count() == 0,
                       'the actions publisher gone')
    names = dict(session.driver.node.get_service_names_and_types())
    assert f'/{NODE_NAME}/reset' not in names
    assert f'/{NODE_NAME}/change_state' in names


def test_failed_configure_keeps_the_node_unconfigured_and_alive(session: NodeSession) -> None:
    results = session.set_parameters(checkpoint='/nonexistent/model.safetensors')
    assert results[0].successful, results[0].reason  # checked when configure loads it
    assert not change_state(session, Transition.TRANSITION_CONFIGURE)
    assert get_state(session) == State.PRIMARY_STATE_UNCONFIGURED
    session.process.check_alive()
    errors = [line for line in session.process.stderr().splitlines()
              if 'configure failed' in line]
    assert len(errors) == 1 and '/nonexistent/model.safetensors' in errors[0], errors
    # Fixed, configure succeeds and the new pipeline starts a fresh stream.
    assert session.set_parameters(checkpoint='')[0].successful
    assert change_state(session, Transition.TRANSITION_CONFIGURE)
    assert change_state(session, Transition.TRANSITION_ACTIVATE)
    session.wait_until(lambda: camera_subscribed(session), 'the camera subscribed')
    session.predict(frame(7), resend_s=60.0)
    assert session.fresh_diagnostics()['values']['memory_slots'] == '1'


def test_shutdown_finalizes_and_ctrl_c_ends_cleanly(session: NodeSession) -> None:
    assert change_state(session, Transition.TRANSITION_ACTIVE_SHUTDOWN)
    assert get_state(session) == State.PRIMARY_STATE_FINALIZED
    session.wait_until(lambda: not camera_subscribed(session), 'the camera unsubscribed')
    session.process.check_alive()
    assert session.process.stop() == 0
    assert 'Traceback' not in session.process.stderr()


def test_undeclarable_parameter_leaves_the_node_up_and_says_why(
        tmp_path: pytest.TempPathFactory) -> None:
    process = NodeProcess(BAD_PARAMETER_DOMAIN, ['memory_bank_length:=0'], log_dir=tmp_path,
                          managed=True)
    session_driver = None
    try:
        from support.ros_driver import Driver

        session_driver = Driver(BAD_PARAMETER_DOMAIN)
        request = ChangeState.Request()
        request.transition.id = Transition.TRANSITION_CONFIGURE
        response = session_driver.call(ChangeState, f'/{NODE_NAME}/change_state', request,
                                       process=process)
        assert not response.success
        state = session_driver.call(GetState, f'/{NODE_NAME}/get_state', GetState.Request(),
                                    process=process).current_state.id
        assert state == State.PRIMARY_STATE_UNCONFIGURED
        wait_until(lambda: 'configure failed' in process.stderr(), 'the reason in the log',
                   process=process)
        line = next(line for line in process.stderr().splitlines()
                    if 'configure failed' in line)
        assert 'memory_bank_length' in line and 'ERROR' in line, line
        assert process.stop() == 0
    finally:
        process.kill()
        if session_driver is not None:
            session_driver.close()
