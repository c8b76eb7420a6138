"""launch/cameras.launch.py run for real: two cameras in one command, one node each in its own
namespace, and a bad `cameras` value refused with a message that says what is wrong.

Each camera gets frames of its own (a frame_id and a range of stamps no other camera uses), so
a prediction on /<name>/malmm/actions shows which camera's frames it came from: never the
other's. Ctrl-c (SIGINT to the launch's process group) ends both nodes and launch with exit 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import Image
from std_msgs.msg import String

from support.domains import domain_id
from support.frames import photo
from support.launch_process import LaunchProcess, launch_env, publish_until
from support.ros_driver import (
    RELIABLE,
    Driver,
    StampClock,
    node_diagnostics,
    raw_image,
    stamp_ns_of,
    wait_until,
)

DOMAIN_ID = domain_id(__file__)
START_S = 120.0  # two nodes starting at once on a busy 2-core machine
HEIGHT, WIDTH = 120, 160
PARAMS_FILE = """\
/**:
  ros__parameters:
    sample_fps: 0.0
    publish_every_n: 2       # checked on both: params_file reaches every camera's node
    memory_bank_length: 4
    num_threads: 1
    qos:
      reliability: reliable
      depth: 5
"""
pytestmark = pytest.mark.slow  # two nodes start


def test_two_cameras_each_predict_from_their_own_frames(installed_env: dict[str, str],
                                                        tmp_path: Path) -> None:
    cameras = {'left': '/left/image_raw', 'right': '/right/image_raw'}
    params_file = tmp_path / 'params.yaml'
    params_file.write_text(PARAMS_FILE)
    arguments = {'cameras': ', '.join(f'{name}={topic}' for name, topic in cameras.items()),
                 'backend': 'onnxruntime', 'params_file': str(params_file)}
    # Stamps 1000 s and 5000 s on: far apart, and no gap in either reaches max_gap_s.
    clocks = {'left': StampClock(start_s=1_000), 'right': StampClock(start_s=5_000)}
    sent: dict[str, set[int]] = {name: set() for name in cameras}
    images = {name: photo(HEIGHT, WIDTH, index).tobytes()
              for index, name in enumerate(cameras)}

    env = launch_env(installed_env, DOMAIN_ID, tmp_path)
    driver = Driver(DOMAIN_ID)
    try:
        subscriptions, actions, publishers = {}, {}, {}
        for name, topic in cameras.items():
            subscriptions[name], actions[name] = driver.subscribe(
                String, f'/{name}/malmm/actions', RELIABLE, convert=lambda m: json.loads(m.data))
            publishers[name] = driver.node.create_publisher(Image, topic, 10)
        _, diagnostics = driver.subscribe(DiagnosticArray, '/diagnostics', RELIABLE,
                                          convert=node_diagnostics)

        def listening() -> set[str]:
            return {status['values'].get('input_topic') for status in diagnostics.items()}

        def status_names() -> dict[str, str]:  # input topic -> the status name of its node
            return {status['values'].get('input_topic'): status['name']
                    for status in diagnostics.items()}

        def publish(_: int) -> None:
            for name, publisher in publishers.items():  # both cameras at once
                stamp = clocks[name].next()
                sent[name].add(stamp)
                publisher.publish(raw_image('rgb8', WIDTH, HEIGHT, WIDTH * 3, images[name],
                                            stamp, frame_id=f'{name}_optical'))

        with LaunchProcess('cameras.launch.py', arguments, env=env,
                           log_path=tmp_path / 'launch.log') as launch:
            wait_until(lambda: all(publishers[n].get_subscription_count() >= 1
                                   and subscriptions[n].get_publisher_count() >= 1
                                   for n in cameras) and set(cameras.values()) <= listening(),
                       'both nodes to come up', timeout=START_S, process=launch)
            assert sorted(launch.started()) == ['anticipate-1', 'anticipate-2'], launch.log()
            names = status_names()  # each camera's /diagnostics status is its own
            assert {names[topic] for topic in cameras.values()} == {
                f'{name}/malmm_anticipate: anticipation' for name in cameras}, names
            publish_until(publish, lambda: all(len(actions[n]) >= 3 for n in cameras),
                          'three predictions from each camera', launch=launch)
            received = {name: inbox.items() for name, inbox in actions.items()}
            launch.stop_cleanly(processes=2)
    finally:
        driver.close()

    for name, predictions in received.items():
        foreign = [p for p in predictions if p['frame_id'] != f'{name}_optical'
                   or stamp_ns_of(p['stamp']) not in sent[name]]
        assert not foreign, f'/{name}/malmm/actions has predictions of other frames: {foreign}'
        seen = [p['frames_seen'] for p in predictions]
        assert all(n % 2 == 0 for n in seen), f'{name}: publish_every_n 2, frames_seen {seen}'


@pytest.mark.parametrize(('cameras', 'message'), [
    ('', 'cameras is empty'),
    ('left=/left/image_raw right', "'right' is not NAME=TOPIC"),
    ('left=/a 2nd=/b', "'2nd' (in '2nd=/b') is not a valid namespace name"),
    ('left/x=/a', "'left/x' (in 'left/x=/a') is not a valid namespace name"),
    ('left=/a//b', "'/a//b' (in 'left=/a//b') is not a valid topic name"),
    ('left=/a,left=/b', "'left' is given twice"),
])
def test_bad_cameras_value_fails_the_launch_with_a_message(
        installed_env: dict[str, str], tmp_path: Path, cameras: str, message: str) -> None:
    env = launch_env(installed_env, DOMAIN_ID, tmp_path)
    with LaunchProcess('cameras.launch.py', {'cameras': cameras}, env=env,
                       log_path=tmp_path / 'launch.log') as launch:
        code = launch.wait_exit()
        log = launch.log()
    assert code != 0, log
    assert message in log, log
    assert launch.started() == {}, 'no node may start when the camera list is wrong'
