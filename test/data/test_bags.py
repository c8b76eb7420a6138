"""Camera bags written and read back with rosbags (no ROS): round trips, order, info, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rosbags.rosbag2 import Writer
from rosbags.typesys import Stores, get_typestore

from malmm_ros.data.bags import (
    COMPRESSED_IMAGE_TYPE,
    IMAGE_TYPE,
    BagFrame,
    BagMessage,
    bag_info,
    image_topics,
    iter_bag_messages,
    read_camera_frames,
    write_camera_bag,
)
from malmm_ros.data.sample_stream import panning_frames
from malmm_ros.errors import DataError, FrameError

START_NS = 1_700_000_000_123_456_789  # a realistic epoch stamp with a non-zero nanosec part
FPS = 10.0
SIZE = (64, 80)
TYPESTORE = get_typestore(Stores.ROS2_KILTED)


def _frames(seconds: float = 2.0) -> list[tuple[np.ndarray, int]]:
    return list(panning_frames(seconds, FPS, size=SIZE, start_ns=START_NS))


def _raw_image(stamp_ns: int, frame_id: str, data: np.ndarray, *, width: int = 4,
               height: int = 2) -> bytes:
    sec, nanosec = divmod(stamp_ns, 1_000_000_000)
    types = TYPESTORE.types
    header = types['std_msgs/msg/Header'](
        stamp=types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec), frame_id=frame_id)
    msg = types[IMAGE_TYPE](header=header, height=height, width=width, encoding='rgb8',
                            is_bigendian=0, step=width * 3, data=data)
    return bytes(TYPESTORE.serialize_cdr(msg, IMAGE_TYPE))


def _write_custom_bag(path: Path, messages: list[tuple[str, str, int, bytes]]) -> None:
    """A bag with arbitrary (topic, msgtype, log time, CDR) messages, written with rosbags."""
    writer = Writer(path, version=9)
    writer.open()
    connections = {}
    for topic, msgtype, log_time, data in messages:
        if topic not in connections:
            connections[topic] = writer.add_connection(topic, msgtype, typestore=TYPESTORE)
        writer.write(connections[topic], log_time, data)
    writer.close()


def _string(text: str) -> bytes:
    msg = TYPESTORE.types['std_msgs/msg/String'](data=text)
    return bytes(TYPESTORE.serialize_cdr(msg, 'std_msgs/msg/String'))


@pytest.mark.parametrize('storage', ['sqlite3', 'mcap'])
@pytest.mark.parametrize('compressed', [False, True], ids=['raw', 'compressed'])
def test_round_trip(tmp_path: Path, storage: str, compressed: bool) -> None:
    frames = _frames()
    bag = tmp_path / 'bag'
    written = write_camera_bag(bag, frames, compressed=compressed, storage=storage,
                               frame_id='kitchen_cam')
    assert written == len(frames) == 20

    read = list(read_camera_frames(bag))
    assert len(read) == len(frames)
    for got, (image, stamp_ns) in zip(read, frames, strict=True):
        assert isinstance(got, BagFrame)
        assert got.stamp_ns == stamp_ns
        assert got.log_time_ns == stamp_ns
        assert got.frame_id == 'kitchen_cam'
        assert got.image.shape == image.shape and got.image.dtype == np.uint8
        if compressed:
            diff = np.abs(got.image.astype(np.int16) - image.astype(np.int16)).mean()
            assert diff < 4.0, diff
        else:
            np.testing.assert_array_equal(got.image, image)

    topic = '/camera/image_raw/compressed' if compressed else '/camera/image_raw'
    msgtype = COMPRESSED_IMAGE_TYPE if compressed else IMAGE_TYPE
    info = bag_info(bag)
    assert info['storage'] == storage
    assert info['message_count'] == 20
    assert info['topics'] == {topic: {'msgtype': msgtype, 'count': 20}}
    assert info['start_ns'] == frames[0][1]
    assert info['end_ns'] == frames[-1][1]
    assert info['duration_ns'] == frames[-1][1] - frames[0][1]
    assert info['duration_s'] == pytest.approx(1.9)
    assert image_topics(bag) == {topic: msgtype}


def test_explicit_topic_and_custom_topic_name(tmp_path: Path) -> None:
    bag = tmp_path / 'bag'
    write_camera_bag(bag, _frames(0.5), topic='/front/rgb', compressed=True)
    frames = list(read_camera_frames(bag, topic='/front/rgb/compressed'))
    assert len(frames) == 5
    with pytest.raises(DataError, match='/front/rgb/compressed'):
        list(read_camera_frames(bag, topic='/front/rgb'))


def test_messages_come_in_log_time_order_with_raw_cdr(tmp_path: Path) -> None:
    frames = _frames(1.0)
    shuffled = [frames[i] for i in (3, 0, 9, 1, 8, 2, 7, 4, 6, 5)]
    bag = tmp_path / 'bag'
    write_camera_bag(bag, shuffled, storage='mcap')
    messages = list(iter_bag_messages(bag))
    assert all(isinstance(m, BagMessage) for m in messages)
    assert [m.log_time_ns for m in messages] == [stamp for _, stamp in frames]
    assert {m.topic for m in messages} == {'/camera/image_raw'}
    assert {m.msgtype for m in messages} == {IMAGE_TYPE}
    first = TYPESTORE.deserialize_cdr(messages[0].rawdata, IMAGE_TYPE)
    assert isinstance(messages[0].rawdata, bytes)
    assert (first.width, first.height, first.encoding, first.step) == (80, 64, 'rgb8', 240)
    np.testing.assert_array_equal(first.data.reshape(64, 80, 3), frames[0][0])
    decoded = [f.stamp_ns for f in read_camera_frames(bag)]
    assert decoded == [stamp for _, stamp in frames]


def test_several_topics(tmp_path: Path) -> None:
    pixels = np.arange(24, dtype=np.uint8)
    bag = tmp_path / 'two_cams'
    _write_custom_bag(bag, [
        ('/left/image_raw', IMAGE_TYPE, 10, _raw_image(10, 'left', pixels)),
        ('/chatter', 'std_msgs/msg/String', 15, _string('hello')),
        ('/right/image_raw', IMAGE_TYPE, 20, _raw_image(20, 'right', pixels)),
        ('/left/image_raw', IMAGE_TYPE, 30, _raw_image(30, 'left', pixels)),
    ])
    info = bag_info(bag)
    assert info['message_count'] == 4
    assert info['topics'] == {
        '/chatter': {'msgtype': 'std_msgs/msg/String', 'count': 1},
        '/left/image_raw': {'msgtype': IMAGE_TYPE, 'count': 2},
        '/right/image_raw': {'msgtype': IMAGE_TYPE, 'count': 1},
    }
    assert image_topics(bag) == {'/left/image_raw': IMAGE_TYPE, '/right/image_raw': IMAGE_TYPE}

    with pytest.raises(DataError, match=r"several image topics.*'/left/image_raw'.*"
                                        r"'/right/image_raw'"):
        list(read_camera_frames(bag))
    left = list(read_camera_frames(bag, topic='/left/image_raw'))
    assert [(f.stamp_ns, f.frame_id) for f in left] == [(10, 'left'), (30, 'left')]
    np.testing.assert_array_equal(left[0].image, pixels.reshape(2, 4, 3))
    with pytest.raises(DataError, match='std_msgs/msg/String'):
        list(read_camera_frames(bag, topic='/chatter'))

    assert [m.topic for m in iter_bag_messages(bag)] == [
        '/left/image_raw', '/chatter', '/right/image_raw', '/left/image_raw']
    assert [m.log_time_ns for m in iter_bag_messages(bag, ['/right/image_raw', '/chatter'])] \
        == [15, 20]
    with pytest.raises(DataError, match='/nope'):
        list(iter_bag_messages(bag, ['/nope']))


def test_bag_without_image_topics(tmp_path: Path) -> None:
    bag = tmp_path / 'chatter'
    _write_custom_bag(bag, [('/chatter', 'std_msgs/msg/String', 1, _string('hi'))])
    with pytest.raises(DataError, match='no image topics'):
        list(read_camera_frames(bag))
    assert image_topics(bag) == {}


def test_bad_frame_names_its_log_time(tmp_path: Path) -> None:
    bag = tmp_path / 'bad'
    good = np.zeros(24, dtype=np.uint8)
    _write_custom_bag(bag, [
        ('/cam', IMAGE_TYPE, 100, _raw_image(100, 'cam', good)),
        ('/cam', IMAGE_TYPE, 200, _raw_image(200, 'cam', good[:5])),  # too few bytes
    ])
    frames = read_camera_frames(bag)
    assert next(frames).stamp_ns == 100
    with pytest.raises(FrameError, match='log time 200 ns'):
        next(frames)


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / 'nothing_here'
    for call in (bag_info, image_topics, lambda p: list(read_camera_frames(p)),
                 lambda p: list(iter_bag_messages(p))):
        with pytest.raises(DataError, match='nothing_here'):
            call(missing)


@pytest.mark.parametrize('kind', ['db3', 'mcap', 'txt', 'dir'])
def test_garbage_is_refused(tmp_path: Path, kind: str) -> None:
    if kind == 'dir':
        path = tmp_path / 'fake_bag'
        path.mkdir()
        (path / 'metadata.yaml').write_text('this: [is not, a rosbag2', encoding='utf-8')
    else:
        path = tmp_path / f'garbage.{kind}'
        path.write_bytes(b'\x00not a bag at all\xff' * 64)
    with pytest.raises(DataError, match=path.name):
        bag_info(path)
    with pytest.raises(DataError, match=path.name):
        list(read_camera_frames(path))


def test_overwrite_refused(tmp_path: Path) -> None:
    bag = tmp_path / 'bag'
    write_camera_bag(bag, _frames(0.3))
    before = sorted(p.name for p in bag.iterdir())
    with pytest.raises(DataError, match='exists'):
        write_camera_bag(bag, _frames(0.3), storage='mcap')
    assert sorted(p.name for p in bag.iterdir()) == before
    assert bag_info(bag)['message_count'] == 3
    plain = tmp_path / 'file.txt'
    plain.write_text('keep me', encoding='utf-8')
    with pytest.raises(DataError, match='file.txt'):
        write_camera_bag(plain, _frames(0.3))
    assert plain.read_text(encoding='utf-8') == 'keep me'


def test_failed_write_leaves_no_bag(tmp_path: Path) -> None:
    frames = _frames(0.3)
    bad = [*frames, (np.zeros((4, 4), dtype=np.uint8), frames[-1][1] + 1)]
    with pytest.raises(FrameError, match='frame 3'):
        write_camera_bag(tmp_path / 'bag', bad)
    assert not (tmp_path / 'bag').exists()
    with pytest.raises(DataError, match='no frames'):
        write_camera_bag(tmp_path / 'empty', [])
    assert not (tmp_path / 'empty').exists()
    with pytest.raises(DataError, match='storage'):
        write_camera_bag(tmp_path / 'x', frames, storage='rosbag1')
    assert not (tmp_path / 'x').exists()


def test_bag_module_is_ros_free() -> None:
    code = ('import sys, malmm_ros.data.bags\n'
            'print(sorted(m for m in sys.modules if m.split(".")[0] in '
            '{"rclpy", "sensor_msgs", "std_msgs", "rosidl_runtime_py", "cv_bridge"}))')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == '[]'
