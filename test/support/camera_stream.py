"""Test helper process: a camera driver that publishes real photos at a fixed rate.

Runs as its own process (own DDS participant, started with the node's Fast DDS profile in its
environment), so camera-sized frames travel as they would from a real driver. Waits until a
subscriber matched, publishes rgb8 frames (sensor-data QoS: best effort, like camera drivers)
stamped `--start-ns` + i / rate until `--seconds` passed or SIGINT/SIGTERM, then prints one JSON
line: {"sent": n, "last_stamp_ns": stamp of the last frame or null}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image

from malmm_ros.data.sample_stream import panning_frames


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--topic', default='/camera/image_raw')
    parser.add_argument('--width', type=int, default=640)
    parser.add_argument('--height', type=int, default=480)
    parser.add_argument('--rate', type=float, default=60.0)
    parser.add_argument('--seconds', type=float, default=60.0)
    parser.add_argument('--start-ns', type=int, default=2_000_000_000_000)
    parser.add_argument('--frame-id', default='camera_stream')
    args = parser.parse_args()

    frames = [frame.tobytes() for frame, _ in panning_frames(
        2.0, fps=4.0, size=(args.height, args.width), seconds_per_scene=0.5)]
    period_ns = round(1e9 / args.rate)
    sent, last_stamp = 0, None
    rclpy.init()
    node = Node('malmm_test_camera_stream')
    try:
        publisher = node.create_publisher(Image, args.topic, qos_profile_sensor_data)
        msg = Image(height=args.height, width=args.width, encoding='rgb8', step=args.width * 3)
        msg.header.frame_id = args.frame_id
        deadline = time.monotonic() + args.seconds
        while rclpy.ok() and publisher.get_subscription_count() == 0:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        next_send = time.monotonic()
        while rclpy.ok() and time.monotonic() < deadline:
            last_stamp = args.start_ns + sent * period_ns
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(last_stamp, 1_000_000_000)
            msg.data = frames[sent % len(frames)]
            try:
                publisher.publish(msg)
            except Exception:  # a signal shut the context down between ok() and publish()
                if rclpy.ok():
                    raise
                break
            sent += 1
            next_send += 1.0 / args.rate
            time.sleep(max(0.0, next_send - time.monotonic()))
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    print(json.dumps({'sent': sent, 'last_stamp_ns': last_stamp}), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
