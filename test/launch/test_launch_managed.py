"""managed:=true in the launch files, run for real: the lifecycle node (`anticipate --managed`)
instead of the plain one.

With autostart:=true the launch configures and activates it, and frames give predictions; that
node runs as a robot would, torch-free from a bundle (runtime onnx in its params file). With
managed:=true alone (here through cameras.launch.py, which passes managed on to each camera's
node) it comes up unconfigured and off the camera; predictions start once this test configures
and activates it over its lifecycle services. Either way ctrl-c (SIGINT to the group) ends
launch and node with exit 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from sensor_msgs.msg import Image
from std_msgs.msg import String

from support.domains import domain_ids
from support.frames import photo
from support.launch_process import LaunchProcess, launch_env, publish_until
from support.ros_driver import (
    NODE_NAME,
    RELIABLE,
    Driver,
    StampClock,
    raw_image,
    stamp_ns_of,
    wait_until,
)

AUTOSTART_DOMAIN, MANUAL_DOMAIN = domain_ids(__file__)
START_S = 120.0  # a node start on a busy 2-core machine: imports, encoder, model
HEIGHT, WIDTH = 120, 160
PARAMS_FILE = """\
/**:
  ros__parameters:
    sample_fps: 0.0
    publish_every_n: 1
    memory_bank_length: 4
    num_threads: 1
    qos:
      reliability: reliable
      depth: 5
"""
pytestmark = pytest.mark.slow  # each launch starts a node (seconds)


class Camera:
    """Frames from the test's driver on one topic, and the node's predictions of them."""

    def __init__(self, driver: Driver, topic: str, actions_topic: str, frame_id: str) -> None:
        self.publisher = driver.node.create_publisher(Image, topic, 10)
        self.actions_sub, self.actions = driver.subscribe(
            String, actions_topic, RELIABLE, convert=lambda m: json.loads(m.data))
        self.frame_id = frame_id
        self.clock = StampClock()
        self.sent: list[int] = []
        self.image = photo(HEIGHT, WIDTH).tobytes()

    def publish(self, _: int = 0) -> None:
        stamp = self.clock.next()
        self.sent.append(stamp)
        self.publisher.publish(raw_image('rgb8', WIDTH, HEIGHT, WIDTH * 3, self.image, stamp,
                                         frame_id=self.frame_id))


def lifecycle_state(driver: Driver, node: str, launch: LaunchProcess) -> int:
    response = driver.call(GetState, f'{node}/get_state', GetState.Request(), process=launch)
    return response.current_state.id


def change_state(driver: Driver, node: str, launch: LaunchProcess, transition: int) -> bool:
    request = ChangeState.Request()
    request.transition.id = transition
    return driver.call(ChangeState, f'{node}/change_state', request, process=launch).success


def managed_command(launch: LaunchProcess) -> list[str]:
    (pid,) = launch.started().values()
    return Path(f'/proc/{pid}/cmdline').read_bytes().decode().split('\0')


def test_autostart_configures_and_activates(installed_env: dict[str, str], tmp_path: Path,
                                            edge_bundle: Path) -> None:
    """As a robot runs it: the torch-free runtime from a bundle, set in the params file."""
    params_file = tmp_path / 'params.yaml'
    params_file.write_text(PARAMS_FILE + f'    runtime: onnx\n    bundle: {edge_bundle}\n')
    arguments = {'managed': 'true', 'autostart': 'true', 'params_file': str(params_file)}
    env = launch_env(installed_env, AUTOSTART_DOMAIN, tmp_path)
    driver = Driver(AUTOSTART_DOMAIN)
    try:
        camera = Camera(driver, '/camera/image_raw', '/malmm/actions', 'managed_camera')
        with LaunchProcess('anticipate.launch.py', arguments, env=env,
                           log_path=tmp_path / 'launch.log') as launch:
            # The camera subscription opens at activate: the launch made both transitions.
            wait_until(lambda: camera.publisher.get_subscription_count() >= 1
                       and camera.actions_sub.get_publisher_count() >= 1,
                       'the node to be active', timeout=START_S, process=launch)
            publish_until(camera.publish, lambda: len(camera.actions) >= 2, 'two predictions',
                          launch=launch)
            state = lifecycle_state(driver, f'/{NODE_NAME}', launch)
            command = managed_command(launch)
            (pid,) = launch.started().values()
            loaded = Path(f'/proc/{pid}/maps').read_text()
            log = launch.log()
            launch.stop_cleanly(processes=1)
    finally:
        driver.close()

    assert state == State.PRIMARY_STATE_ACTIVE
    assert '--managed' in command[:command.index('--ros-args')], command
    assert 'libtorch' not in loaded, 'runtime onnx mapped libtorch'
    assert 'int8' in log, log[-2000:]  # precision auto: the bundle's INT8 encoder
    predictions = camera.actions.items()
    assert all(p['frame_id'] == 'managed_camera' and stamp_ns_of(p['stamp']) in camera.sent
               for p in predictions), predictions


def test_managed_alone_waits_unconfigured_for_the_transitions(installed_env: dict[str, str],
                                                              tmp_path: Path) -> None:
    params_file = tmp_path / 'params.yaml'
    params_file.write_text(PARAMS_FILE)
    node = f'/cell/{NODE_NAME}'
    arguments = {'cameras': 'cell=/cell/image_raw', 'managed': 'true',
                 'params_file': str(params_file)}
    env = launch_env(installed_env, MANUAL_DOMAIN, tmp_path)
    driver = Driver(MANUAL_DOMAIN)
    try:
        camera = Camera(driver, '/cell/image_raw', '/cell/malmm/actions', 'cell_camera')
        with LaunchProcess('cameras.launch.py', arguments, env=env,
                           log_path=tmp_path / 'launch.log') as launch:
            # Once the node is up, unconfigured: off the camera, silent.
            client = driver.node.create_client(GetState, f'{node}/get_state')
            wait_until(client.service_is_ready, f'{node}/get_state', timeout=START_S,
                       process=launch)
            driver.node.destroy_client(client)
            unconfigured = lifecycle_state(driver, node, launch)
            command = managed_command(launch)
            for _ in range(5):  # frames nobody takes
                camera.publish()
            early = set(camera.sent)
            readers = camera.publisher.get_subscription_count()
            publishers = camera.actions_sub.get_publisher_count()

            configured = change_state(driver, node, launch, Transition.TRANSITION_CONFIGURE)
            inactive = lifecycle_state(driver, node, launch)
            inactive_readers = camera.publisher.get_subscription_count()
            activated = change_state(driver, node, launch, Transition.TRANSITION_ACTIVATE)
            active = lifecycle_state(driver, node, launch)
            wait_until(lambda: camera.publisher.get_subscription_count() >= 1,
                       'the camera subscription after activate', process=launch)
            publish_until(camera.publish, lambda: len(camera.actions) >= 2, 'two predictions',
                          launch=launch)
            launch.stop_cleanly(processes=1)
    finally:
        driver.close()

    assert '--managed' in command[:command.index('--ros-args')], command
    assert unconfigured == State.PRIMARY_STATE_UNCONFIGURED
    assert readers == 0 and publishers == 0, 'unconfigured: no camera subscription, no output'
    assert configured and inactive == State.PRIMARY_STATE_INACTIVE
    assert inactive_readers == 0, 'inactive: still off the camera'
    assert activated and active == State.PRIMARY_STATE_ACTIVE
    predictions = camera.actions.items()
    assert all(p['frame_id'] == 'cell_camera' for p in predictions), predictions
    stamps = {stamp_ns_of(p['stamp']) for p in predictions}
    assert stamps <= set(camera.sent) and not stamps & early, (sorted(stamps), sorted(early))
