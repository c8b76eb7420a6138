"""The node is never silently wrong about its input (issue 10, items 1-3, 15).

- it logs where it listens (topic, transport, QoS) and, starved, says so in /diagnostics with
  the image topics the graph does have;
- `input_transport: compressed` follows the `image` remap (`<image>/compressed`);
- zero, constant or ever-decreasing stamps still give predictions, at most `sample_fps` by
  arrival time, with a diagnostics WARN naming the problem; `nanosec >= 1e9` is a bad frame;
- `~/reset` calls and pipeline rebuilds are counted in diagnostics `resets`.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from support.domains import domain_ids
from support.frames import photo
from support.ros_driver import (
    CAMERA_TOPIC,
    CONFIG,
    RELIABLE,
    WAIT_S,
    Driver,
    NodeProcess,
    NodeSession,
    compressed_image,
    node_diagnostics,
    node_executable,
    raw_image,
    ros_env,
    running_session,
    wait_until,
)

# The stamps / resets node, the starved node, the remapped node.
DOMAIN_ID, STARVED_DOMAIN_ID, REMAP_DOMAIN_ID = domain_ids(__file__)
SAMPLE_FPS = 2.0
HEIGHT, WIDTH = 64, 96
PHOTO = photo(HEIGHT, WIDTH, 1).tobytes()
WARN = 1  # diagnostic_msgs/DiagnosticStatus.WARN


def _frame(stamp: Time) -> Image:
    msg = raw_image('rgb8', WIDTH, HEIGHT, WIDTH * 3, PHOTO, 0)
    msg.header.stamp = stamp
    return msg


@pytest.fixture(scope='module')
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeSession]:
    params = [f'sample_fps:={SAMPLE_FPS}', 'memory_bank_length:=4', 'max_gap_s:=0.0',
              'backend:=auto']
    yield from running_session(DOMAIN_ID, params, log_dir=tmp_path_factory.mktemp('stamps'))


def _counts(session: NodeSession) -> dict[str, int]:
    values = session.fresh_diagnostics()['values']
    return {key: int(values[key]) for key in ('frames_in', 'processed', 'predictions',
                                              'bad_frames', 'resets')}


def test_start_log_names_topic_transport_and_qos(session: NodeSession) -> None:
    assert f'listening on {CAMERA_TOPIC} (sensor_msgs/Image, best_effort, depth 1)' in \
        session.process.stderr()


def test_backend_auto_logs_what_it_chose_and_why(session: NodeSession) -> None:
    stderr = session.process.stderr()
    assert 'encoder backend auto -> onnxruntime (no TensorRT' in stderr
    assert '[malmm_anticipate]' in stderr.split('encoder backend auto')[0].splitlines()[-1]


# -- stamps that are not a clock -----------------------------------------------------------

RATE_HZ = 10.0
SECONDS = 6.0

PATTERNS = {
    'zero': (lambda k: Time(sec=0, nanosec=0), 'zero stamps'),
    'constant': (lambda k: Time(sec=1234, nanosec=5678), 'constant stamps'),
    'decreasing': (lambda k: Time(sec=100_000 - k, nanosec=0), 'going back'),
}


@pytest.mark.parametrize('pattern', list(PATTERNS))
def test_unusable_stamps_are_sampled_by_arrival_and_reported(session: NodeSession,
                                                             pattern: str) -> None:
    stamp_of, problem = PATTERNS[pattern]
    session.reset()
    before = _counts(session)
    predictions_before = len(session.actions)
    start = time.monotonic()
    frames = int(RATE_HZ * SECONDS)
    for k in range(frames):
        session.publish(_frame(stamp_of(k)))
        time.sleep(1.0 / RATE_HZ)
    elapsed = time.monotonic() - start
    status = session.wait_diagnostics(lambda s: problem in s['message'],
                                      f'a diagnostics message naming {problem!r}')
    assert status['level'] == WARN
    assert status['values']['memory_clock'] == 'arrival'
    after = _counts(session)
    processed = after['processed'] - before['processed']
    # Never above sample_fps by arrival time (a burst of 2 allowed), so never every frame...
    assert processed <= SAMPLE_FPS * elapsed + 3, (processed, elapsed)
    # ...and not one prediction then silence: frames keep being used.
    assert processed >= 3
    assert len(session.actions) - predictions_before >= 3
    # A stamp going back once is a looped bag (reset); going back on every frame is not.
    assert after['resets'] - before['resets'] <= 4


def test_nanosec_out_of_range_is_a_bad_frame(session: NodeSession) -> None:
    before = _counts(session)
    session.publish(_frame(Time(sec=50, nanosec=1_000_000_000)))
    session.wait_diagnostics(lambda s: int(s['values']['bad_frames']) > before['bad_frames'],
                             'the bad stamp counted in bad_frames')
    assert 'nanosec below 1e9' in session.process.stderr()


# -- resets are counted --------------------------------------------------------------------


def test_reset_calls_and_rebuilds_are_counted(session: NodeSession) -> None:
    before = _counts(session)['resets']
    for _ in range(5):
        assert session.reset().success
    results = session.set_parameters(memory_bank_length=6)
    assert all(r.successful for r in results)
    session.wait_diagnostics(lambda s: int(s['values']['resets']) >= before + 6,
                             'resets counting 5 service calls and 1 rebuild')
    wait_until(lambda: 'pipeline rebuilt for memory_bank_length' in session.process.stderr(),
               'the rebuild in the log', process=session.process)


# -- a node that gets nothing ----------------------------------------------------------------


def test_starved_node_names_its_topic_and_the_graphs_image_topics(tmp_path: Path) -> None:
    with NodeProcess(STARVED_DOMAIN_ID, ['stale_after_s:=1.0'], log_dir=tmp_path) as node:
        driver = Driver(STARVED_DOMAIN_ID)
        try:
            # The camera is on another topic than the node's remap (the usual mistake).
            driver.node.create_publisher(Image, '/camera/color/image_raw', 1)
            driver.node.create_publisher(CompressedImage, '/camera/color/image_raw/compressed',
                                         1)
            _, statuses = driver.subscribe(DiagnosticArray, '/diagnostics', RELIABLE,
                                           convert=node_diagnostics)

            def starved() -> dict | None:
                for status in statuses.items():
                    if '/camera/color/image_raw/compressed' in status['message']:
                        return status
                return None
            status = wait_until(starved, 'a starved diagnostics message', process=node)
        finally:
            driver.close()
        message = status['message']
        assert message.startswith(f'no frames on {CAMERA_TOPIC} for ')
        assert 'sensor_msgs/Image topics: /camera/color/image_raw;' in message
        assert status['values']['input_topic'] == CAMERA_TOPIC
        wait_until(lambda: f'no frames on {CAMERA_TOPIC}' in node.stderr(), 'the WARN line',
                   process=node)


# -- compressed input follows the image remap -------------------------------------------------


def test_compressed_input_follows_the_image_remap(tmp_path: Path) -> None:
    topic = '/cam/front'
    cmd = [node_executable(), '--ros-args', '--params-file', str(CONFIG), '-r',
           f'image:={topic}', '-p', 'input_transport:=compressed', '-p', 'num_threads:=1',
           '-p', 'sample_fps:=0.0']
    err_path = tmp_path / 'node.stderr'
    with open(err_path, 'wb') as err:
        node = subprocess.Popen(cmd, env=ros_env(REMAP_DOMAIN_ID), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    driver = Driver(REMAP_DOMAIN_ID)
    try:
        publisher = driver.node.create_publisher(CompressedImage, f'{topic}/compressed', 10)
        _, actions = driver.subscribe(String, '/malmm/actions', RELIABLE)
        ok, jpeg = cv2.imencode('.jpg', photo(120, 160, 2)[..., ::-1])
        assert ok
        wait_until(lambda: publisher.get_subscription_count() >= 1 or node.poll() is not None,
                   'the node to subscribe to <image>/compressed')
        assert node.poll() is None, err_path.read_text()
        deadline = time.monotonic() + WAIT_S
        k = 0
        while not len(actions) and time.monotonic() < deadline and node.poll() is None:
            k += 1
            publisher.publish(compressed_image('jpeg', jpeg.tobytes(), 1_000_000_000 * k))
            time.sleep(0.5)
        assert len(actions), err_path.read_text()[-3000:]
        assert f'listening on {topic}/compressed (sensor_msgs/CompressedImage' in \
            err_path.read_text()
    finally:
        driver.close()
        node.kill()
        node.wait(timeout=15)
