"""launch/anticipate.launch.py run for real, as `ros2 launch malmm_ros anticipate.launch.py`
runs it: the node from the colcon install, fed over DDS, and ctrl-c (SIGINT to the process
group) ends launch and node with exit 0, without launch escalating to SIGTERM or SIGKILL.

Two launches, one per domain: the defaults (the installed parameter file, the default camera
topic, fed by a camera process), then every argument changed at once (a namespace, another
topic, compressed input, the torch backend and a parameter file of the test's): each argument
has an effect of its own to check, so one launch shows them all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.srv import GetParameters
from rclpy.parameter import parameter_value_to_python
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from support.domains import domain_ids
from support.frames import photo
from support.launch_process import LaunchProcess, launch_env, publish_until
from support.ros_driver import (
    CAMERA_TOPIC,
    NODE_NAME,
    RELIABLE,
    CameraStream,
    Driver,
    StampClock,
    compressed_image,
    node_diagnostics,
    stamp_ns_of,
    wait_until,
)

PACKAGE = 'malmm_ros'
DEFAULTS_DOMAIN, ARGUMENTS_DOMAIN = domain_ids(__file__)
START_S = 120.0  # a node start on a busy 2-core machine: imports, encoder, model
pytestmark = pytest.mark.slow  # each launch starts a node (seconds)


def _get_parameters(driver: Driver, node: str, launch: LaunchProcess,
                    *names: str) -> dict[str, object]:
    response = driver.call(GetParameters, f'{node}/get_parameters',
                           GetParameters.Request(names=list(names)), process=launch)
    return {name: parameter_value_to_python(value)
            for name, value in zip(names, response.values, strict=True)}


def test_defaults_listen_on_the_camera_topic_with_the_installed_parameters(
        installed_env: dict[str, str], tmp_path: Path) -> None:
    """No argument but the backend: the node reads /camera/image_raw (the launch's default
    remap; unremapped it would read /image), publishes on /malmm/actions and samples at the
    installed file's 1 fps: predicted frames are a second of stamps apart, not 0.1 s."""
    env = launch_env(installed_env, DEFAULTS_DOMAIN, tmp_path)
    driver = Driver(DEFAULTS_DOMAIN)
    try:
        actions_sub, actions = driver.subscribe(String, '/malmm/actions', RELIABLE,
                                                convert=lambda m: json.loads(m.data))
        _, diagnostics = driver.subscribe(DiagnosticArray, '/diagnostics', RELIABLE,
                                          convert=node_diagnostics)
        with LaunchProcess('anticipate.launch.py', {'backend': 'onnxruntime'}, env=env,
                           log_path=tmp_path / 'launch.log') as launch:
            wait_until(lambda: actions_sub.get_publisher_count() >= 1 and len(diagnostics),
                       'the node to come up', timeout=START_S, process=launch)
            rate, start_ns = 10.0, 2_000_000_000_000
            with CameraStream(DEFAULTS_DOMAIN, log_dir=tmp_path, width=320, height=240,
                              rate=rate, start_ns=start_ns, frame_id='launch_camera') as camera:
                wait_until(lambda: len(actions) >= 3, 'three predictions', process=launch)
                sent = camera.stop()
            predictions = actions.items()
            status = diagnostics.items()[-1]
            parameters = _get_parameters(driver, f'/{NODE_NAME}', launch, 'sample_fps',
                                         'backend', 'input_transport')
            (pid,) = launch.started().values()
            command = Path(f'/proc/{pid}/cmdline').read_bytes().split(b'\0')
            launch.stop_cleanly(processes=1)
    finally:
        driver.close()

    # What `ros2 launch` finds through the ament index: the workspace's installed wrapper.
    prefixes = env['AMENT_PREFIX_PATH'].split(os.pathsep)
    assert any(command[1].decode() == f'{prefix}/lib/{PACKAGE}/anticipate'
               for prefix in prefixes), (command, prefixes)
    period_ns = round(1e9 / rate)
    stamps = [stamp_ns_of(p['stamp']) for p in predictions]
    assert all(p['frame_id'] == 'launch_camera' for p in predictions), predictions
    assert all(start_ns <= s <= sent['last_stamp_ns'] and (s - start_ns) % period_ns == 0
               for s in stamps), ('predictions of frames the camera never sent', stamps, sent)
    # 1 fps by stamp: the sampler takes a frame up to half a camera interval early.
    gaps = np.diff(stamps)
    assert (gaps >= 1e9 - period_ns / 2).all(), f'stamp gaps {gaps.tolist()} under 1 s'
    assert status['values']['input_topic'] == CAMERA_TOPIC
    assert status['values']['input_type'] == 'sensor_msgs/Image'
    assert status['values']['backend'].startswith('onnxruntime'), status['values']
    assert parameters == {'sample_fps': 1.0, 'backend': 'onnxruntime',
                          'input_transport': 'raw'}


PARAMS_FILE = """\
/**:
  ros__parameters:
    sample_fps: 0.0          # every frame
    publish_every_n: 3       # checked: predictions at frames_seen 3, 6, 9, ...
    memory_bank_length: 4    # checked: at most 4 slots
    num_threads: 1
    backend: onnxruntime     # the backend argument wins over the file
    input_transport: raw     # and so does input_transport
    qos:
      reliability: reliable
      depth: 5
"""


def test_arguments_namespace_topic_compressed_backend_and_params_file(
        installed_env: dict[str, str], tmp_path: Path) -> None:
    namespace, topic, frame_id = 'cell_a', '/cell_a/camera/image_raw', 'cell_a_camera'
    params_file = tmp_path / 'params.yaml'
    params_file.write_text(PARAMS_FILE)
    arguments = {'namespace': namespace, 'image_topic': topic,
                 'input_transport': 'compressed', 'backend': 'torch',
                 'params_file': str(params_file)}
    jpegs = []
    for index in range(4):
        ok, data = cv2.imencode('.jpg', np.ascontiguousarray(photo(120, 160, index)[..., ::-1]))
        assert ok
        jpegs.append(data.tobytes())
    clock, sent = StampClock(), set()

    env = launch_env(installed_env, ARGUMENTS_DOMAIN, tmp_path)
    driver = Driver(ARGUMENTS_DOMAIN)
    try:
        actions_sub, actions = driver.subscribe(String, f'/{namespace}/malmm/actions', RELIABLE,
                                                convert=lambda m: json.loads(m.data))
        root_sub, root_actions = driver.subscribe(String, '/malmm/actions', RELIABLE)
        _, diagnostics = driver.subscribe(DiagnosticArray, '/diagnostics', RELIABLE,
                                          convert=node_diagnostics)
        compressed_pub = driver.node.create_publisher(CompressedImage, f'{topic}/compressed',
                                                      10)
        raw_pub = driver.node.create_publisher(Image, topic, 10)

        def publish(index: int) -> None:
            stamp = clock.next()
            sent.add(stamp)
            compressed_pub.publish(compressed_image('jpeg', jpegs[index % len(jpegs)], stamp,
                                                    frame_id=frame_id))

        with LaunchProcess('anticipate.launch.py', arguments, env=env,
                           log_path=tmp_path / 'launch.log') as launch:
            wait_until(lambda: compressed_pub.get_subscription_count() >= 1
                       and actions_sub.get_publisher_count() >= 1 and len(diagnostics),
                       'the node to come up', timeout=START_S, process=launch)
            publish_until(publish, lambda: len(actions) >= 3, 'three predictions',
                          launch=launch)
            predictions = actions.items()
            status = diagnostics.items()[-1]
            # Compressed only: nobody reads the raw topic; nothing is published at the root.
            raw_readers = raw_pub.get_subscription_count()
            root_publishers = root_sub.get_publisher_count()
            parameters = _get_parameters(
                driver, f'/{namespace}/{NODE_NAME}', launch, 'backend', 'input_transport',
                'sample_fps', 'publish_every_n', 'memory_bank_length')
            launch.stop_cleanly(processes=1)
    finally:
        driver.close()

    assert all(p['frame_id'] == frame_id and stamp_ns_of(p['stamp']) in sent
               for p in predictions), predictions
    seen = [p['frames_seen'] for p in predictions]
    assert all(n % 3 == 0 for n in seen), f'publish_every_n 3, yet frames_seen {seen}'
    assert all(p['memory_slots'] <= 4 for p in predictions), predictions
    assert status['values']['input_topic'] == f'{topic}/compressed'
    assert status['values']['input_type'] == 'sensor_msgs/CompressedImage'
    assert status['values']['backend'].startswith('torch'), status['values']
    assert raw_readers == 0
    assert root_publishers == 0 and len(root_actions) == 0
    assert parameters == {'backend': 'torch', 'input_transport': 'compressed',
                          'sample_fps': 0.0, 'publish_every_n': 3, 'memory_bank_length': 4}
