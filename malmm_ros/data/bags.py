"""rosbag2 camera bags without ROS: write frames, read frames, list raw messages.

Built on the `rosbags` library (pure Python), so the core can make and read bags, and the tests
can check replayed messages against the bag, without rclpy. Bags are standard rosbag2
directories (sqlite3 or mcap storage, metadata version 9) that `ros2 bag` also reads.
Every problem with a bag or its path is a DataError naming the path; a frame that cannot be
decoded is a FrameError naming its log time.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore

from malmm_ros.errors import DataError, FrameError, MalmmError
from malmm_ros.imaging import decode_compressed, decode_image
from malmm_ros.stamps import stamp_ns, stamp_parts

__all__ = [
    'COMPRESSED_IMAGE_TYPE',
    'IMAGE_TYPE',
    'IMAGE_TYPES',
    'STORAGES',
    'BagFrame',
    'BagMessage',
    'CameraMessage',
    'bag_info',
    'image_topics',
    'iter_bag_messages',
    'iter_camera_messages',
    'read_camera_frames',
    'write_camera_bag',
]

_LOG = logging.getLogger(__name__)

IMAGE_TYPE = 'sensor_msgs/msg/Image'
COMPRESSED_IMAGE_TYPE = 'sensor_msgs/msg/CompressedImage'
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE)
STORAGES = {'sqlite3': StoragePlugin.SQLITE3, 'mcap': StoragePlugin.MCAP}
_SUFFIX_STORAGE = {'.db3': 'sqlite3', '.mcap': 'mcap'}

# Message definitions of the ROS distribution the package targets (Kilted); Image and
# CompressedImage are unchanged since Foxy, so the bags read in any ROS 2 distribution.
_TYPESTORE = get_typestore(Stores.ROS2_KILTED)


@dataclass(frozen=True)
class BagMessage:
    """One message as stored: serialized CDR bytes, ready to publish again unchanged."""

    topic: str
    msgtype: str
    log_time_ns: int
    rawdata: bytes


@dataclass(frozen=True)
class BagFrame:
    """One decoded camera frame of a bag: header stamp, log time, frame_id and RGB pixels."""

    stamp_ns: int
    log_time_ns: int
    frame_id: str
    image: np.ndarray


def _stamp(ns: int) -> Any:
    sec, nanosec = stamp_parts(ns)
    return _TYPESTORE.types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec)


def _check_frame(index: int, image: Any, stamp_ns: Any) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3:
        shape = getattr(image, 'shape', None)
        dtype = getattr(image, 'dtype', type(image).__name__)
        raise FrameError(f'frame {index}: expected an HxWx3 uint8 RGB array, got shape {shape} '
                         f'dtype {dtype}')
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise FrameError(f'frame {index}: empty image of shape {image.shape}')
    if not isinstance(stamp_ns, int | np.integer) or stamp_ns < 0:
        raise FrameError(f'frame {index}: stamp_ns must be a non-negative integer, '
                         f'got {stamp_ns!r}')


def _serialize(image: np.ndarray, stamp_ns: int, *, compressed: bool, frame_id: str,
               jpeg_quality: int) -> bytes:
    header = _TYPESTORE.types['std_msgs/msg/Header'](stamp=_stamp(stamp_ns), frame_id=frame_id)
    if compressed:
        ok, jpeg = cv2.imencode('.jpg', cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
        if not ok:
            raise FrameError(f'JPEG encoding failed for a {image.shape} frame')
        msg = _TYPESTORE.types[COMPRESSED_IMAGE_TYPE](
            header=header, format='jpeg', data=np.asarray(jpeg, dtype=np.uint8).reshape(-1))
        msgtype = COMPRESSED_IMAGE_TYPE
    else:
        height, width = image.shape[:2]
        msg = _TYPESTORE.types[IMAGE_TYPE](
            header=header, height=height, width=width, encoding='rgb8', is_bigendian=0,
            step=width * 3, data=np.ascontiguousarray(image).reshape(-1))
        msgtype = IMAGE_TYPE
    return bytes(_TYPESTORE.serialize_cdr(msg, msgtype))


def write_camera_bag(path: str | Path, frames: Iterable[tuple[np.ndarray, int]], *,
                     topic: str = '/camera/image_raw', compressed: bool = False,
                     storage: str = 'sqlite3', frame_id: str = 'camera',
                     jpeg_quality: int = 90) -> int:
    """Write (HxWx3 uint8 RGB, stamp_ns) frames as a rosbag2 camera bag; return messages written.

    Raw frames become sensor_msgs/msg/Image (rgb8) on `topic`; with `compressed` they become
    sensor_msgs/msg/CompressedImage (jpeg) on `topic + '/compressed'`, as image_transport names
    them. Header stamp and log time are both `stamp_ns`, so replaying the bag reproduces the
    camera's timing. An existing `path` is never overwritten; a failed write leaves no bag.
    """
    path = Path(path)
    if path.exists():
        raise DataError(f'{path} exists already; not overwriting it')
    if storage not in STORAGES:
        raise DataError(f'unknown bag storage {storage!r}; expected one of {sorted(STORAGES)}')
    if not 1 <= int(jpeg_quality) <= 100:
        raise DataError(f'jpeg_quality must be in 1..100, got {jpeg_quality}')
    if not topic.startswith('/') or topic.endswith('/'):
        raise DataError(f'topic {topic!r} must start with "/" and not end with "/"')
    out_topic = topic + '/compressed' if compressed else topic
    msgtype = COMPRESSED_IMAGE_TYPE if compressed else IMAGE_TYPE

    writer = Writer(path, version=Writer.VERSION_LATEST, storage_plugin=STORAGES[storage])
    count = 0
    try:
        writer.open()
        connection = writer.add_connection(out_topic, msgtype, typestore=_TYPESTORE)
        for index, (image, stamp_ns) in enumerate(frames):
            _check_frame(index, image, stamp_ns)
            data = _serialize(image, int(stamp_ns), compressed=compressed, frame_id=frame_id,
                              jpeg_quality=jpeg_quality)
            writer.write(connection, int(stamp_ns), data)
            count += 1
        if count == 0:
            raise DataError(f'{path}: no frames to write')
        writer.close()
    except BaseException as exc:
        writer.abort()
        shutil.rmtree(path, ignore_errors=True)  # it did not exist before: ours to remove
        if isinstance(exc, MalmmError) or not isinstance(exc, Exception):
            raise
        raise DataError(f'{path}: cannot write the bag: {exc}') from exc
    _LOG.info('wrote %d %s messages on %s to %s', count, msgtype, out_topic, path)
    return count


def _storage_of(path: Path) -> str:
    if path.is_file():
        return _SUFFIX_STORAGE.get(path.suffix, 'unknown')
    for child in sorted(path.iterdir()):
        if child.suffix in _SUFFIX_STORAGE:
            return _SUFFIX_STORAGE[child.suffix]
    return 'unknown'


def _open(path: str | Path) -> Reader:
    """An opened rosbags Reader, or a DataError that names the path and says why."""
    path = Path(path)
    if not path.exists():
        raise DataError(f'bag {path} does not exist')
    try:
        reader = Reader(path)
        reader.open()
    except Exception as exc:  # rosbags raises ReaderError, yaml, sqlite and mcap errors
        raise DataError(f'{path} is not a readable rosbag2 bag: {exc}') from exc
    return reader


def _messages(reader: Reader, connections: list[Any], path: Path
              ) -> Iterator[tuple[Any, int, bytes]]:
    """Reader.messages, with storage failures turned into DataError."""
    stream = iter(reader.messages(connections=connections))
    while True:
        try:
            item = next(stream)
        except StopIteration:
            return
        except Exception as exc:  # damaged storage: sqlite, mcap or decompression errors
            raise DataError(f'{path}: cannot read messages: {exc}') from exc
        yield item


def _topics(reader: Reader) -> dict[str, str]:
    return {c.topic: c.msgtype for c in reader.connections}


def image_topics(path: str | Path) -> dict[str, str]:
    """Topic -> msgtype of the bag's Image and CompressedImage topics."""
    reader = _open(path)
    try:
        return {t: m for t, m in sorted(_topics(reader).items()) if m in IMAGE_TYPES}
    finally:
        reader.close()


def iter_bag_messages(path: str | Path, topics: Iterable[str] | None = None
                      ) -> Iterator[BagMessage]:
    """Yield the bag's messages (all, or those on `topics`) in log-time order, undecoded.

    For replay: the CDR bytes go back on the wire unchanged, header stamps included.
    """
    path = Path(path)
    reader = _open(path)
    try:
        available = _topics(reader)
        if topics is None:
            connections = list(reader.connections)
        else:
            wanted = set(topics)
            missing = sorted(wanted - set(available))
            if missing:
                raise DataError(f'{path} has no topic(s) {missing}; it has {sorted(available)}')
            connections = [c for c in reader.connections if c.topic in wanted]
        for connection, log_time, rawdata in _messages(reader, connections, path):
            yield BagMessage(connection.topic, connection.msgtype, int(log_time), bytes(rawdata))
    finally:
        reader.close()


def _pick_image_topic(path: Path, available: dict[str, str], topic: str | None) -> str:
    images = sorted(t for t, m in available.items() if m in IMAGE_TYPES)
    if topic is None:
        if len(images) != 1:
            what = 'no image topics' if not images else f'several image topics {images}'
            raise DataError(f'{path} has {what}; choose one with a topic '
                            f'(topics: {sorted(available)})')
        return images[0]
    if topic not in available:
        raise DataError(f'{path} has no topic {topic!r}; its image topics are {images}')
    if available[topic] not in IMAGE_TYPES:
        raise DataError(f'{path}: topic {topic!r} holds {available[topic]}, not '
                        f'{" or ".join(IMAGE_TYPES)}')
    return topic


def _deserialize(msgtype: str, rawdata: bytes) -> Any:
    try:
        return _TYPESTORE.deserialize_cdr(rawdata, msgtype)
    except Exception as exc:  # truncated or foreign CDR
        raise FrameError(f'cannot deserialize {msgtype} ({len(rawdata)} bytes): {exc}'
                         ) from exc


def _pixels(msgtype: str, msg: Any) -> np.ndarray:
    if msgtype == COMPRESSED_IMAGE_TYPE:
        return decode_compressed(msg.format, msg.data)
    return decode_image(msg.encoding, int(msg.width), int(msg.height), int(msg.step),
                        bool(msg.is_bigendian), msg.data)


def read_camera_frames(path: str | Path, topic: str | None = None) -> Iterator[BagFrame]:
    """Yield the decoded RGB frames of one image topic (Image or CompressedImage) in log order.

    With `topic` None the bag must hold exactly one image topic, so a plain camera bag needs no
    arguments and an ambiguous one is refused rather than guessed.
    """
    with contextlib.closing(iter_camera_messages(path, topic)) as messages:
        for message in messages:
            try:
                image = _pixels(message.msgtype, message.message)
            except FrameError as exc:
                raise FrameError(f'{path} {message.topic} message at log time '
                                 f'{message.log_time_ns} ns: {exc}') from exc
            yield BagFrame(message.stamp_ns, message.log_time_ns, message.frame_id, image)


@dataclass(frozen=True)
class CameraMessage:
    """One camera message with its header read and its pixels not yet decoded.

    Lets a reader that subsamples by stamp (the node's sampling, the evaluation) skip the
    costly decoding of frames it drops: `decode()` does it on demand.
    """

    stamp_ns: int
    log_time_ns: int
    frame_id: str
    msgtype: str
    message: Any  # the deserialized Image or CompressedImage
    topic: str = ''

    def decode(self) -> np.ndarray:
        """HxWx3 uint8 RGB pixels; FrameError (naming the log time) if they cannot be used."""
        try:
            return _pixels(self.msgtype, self.message)
        except FrameError as exc:
            raise FrameError(f'message at log time {self.log_time_ns} ns: {exc}') from exc


def iter_camera_messages(path: str | Path, topic: str | None = None
                         ) -> Iterator[CameraMessage]:
    """Yield one image topic's messages (as `read_camera_frames` picks it) with header stamps,
    leaving the pixels to `CameraMessage.decode()`."""
    path = Path(path)
    reader = _open(path)
    try:
        topic = _pick_image_topic(path, _topics(reader), topic)
        connections = [c for c in reader.connections if c.topic == topic]
        for connection, log_time, rawdata in _messages(reader, connections, path):
            try:
                msg = _deserialize(connection.msgtype, bytes(rawdata))
                stamp = stamp_ns(msg.header.stamp)
            except FrameError as exc:
                raise FrameError(f'{path} {topic} message at log time {log_time} ns: {exc}'
                                 ) from exc
            yield CameraMessage(stamp, int(log_time), str(msg.header.frame_id),
                                connection.msgtype, msg, topic)
    finally:
        reader.close()


def bag_info(path: str | Path) -> dict[str, Any]:
    """Summary of a bag: storage, message count, start/end log times, duration, topics."""
    path = Path(path)
    reader = _open(path)
    try:
        counts: dict[str, int] = {}
        for connection in reader.connections:
            counts[connection.topic] = counts.get(connection.topic, 0) + connection.msgcount
        topics = {t: {'msgtype': m, 'count': counts.get(t, 0)}
                  for t, m in sorted(_topics(reader).items())}
        count = int(reader.message_count)
        # rosbags reports end_time as one nanosecond after the last message.
        start = int(reader.start_time) if count else 0
        end = max(start, int(reader.end_time) - 1) if count else 0
        duration = end - start
        return {
            'path': str(path),
            'storage': _storage_of(path),
            'message_count': count,
            'start_ns': start,
            'end_ns': end,
            'duration_ns': duration,
            'duration_s': duration / 1e9,
            'topics': topics,
        }
    except MalmmError:
        raise
    except Exception as exc:  # metadata that rosbags parsed but cannot summarise
        raise DataError(f'{path}: cannot read bag metadata: {exc}') from exc
    finally:
        reader.close()
