"""Test helper process: subscribe to an image topic and write what arrives as JSON.

Runs as its own process (own rclpy context, own DDS participant) so the test process never
initialises rclpy. Stops after --count messages, or at --timeout seconds, or on SIGINT/SIGTERM,
and then writes {"messages": [...], "timed_out": bool} to --out. Each message is summarised by
its header stamp, frame_id, size and the SHA-256 of its decoded RGB pixels.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import rclpy
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image

from malmm_ros.imaging import decode_compressed, decode_image

__all__ = ['main']


def _summary(msg: Image | CompressedImage) -> dict[str, object]:
    if isinstance(msg, CompressedImage):
        rgb = decode_compressed(msg.format, bytes(msg.data))
    else:
        rgb = decode_image(msg.encoding, msg.width, msg.height, msg.step,
                           bool(msg.is_bigendian), bytes(msg.data))
    return {
        'stamp_ns': msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec,
        'frame_id': msg.header.frame_id,
        'height': int(rgb.shape[0]),
        'width': int(rgb.shape[1]),
        'sha256': hashlib.sha256(rgb.tobytes()).hexdigest(),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--topic', required=True)
    parser.add_argument('--type', choices=('raw', 'compressed'), default='raw')
    parser.add_argument('--count', type=int, required=True)
    parser.add_argument('--out', required=True)
    parser.add_argument('--timeout', type=float, default=30.0)
    parser.add_argument('--best-effort', action='store_true')
    args = parser.parse_args()

    received: list[dict[str, object]] = []
    rclpy.init()
    node = Node('malmm_test_collect')
    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100,
                     reliability=ReliabilityPolicy.BEST_EFFORT if args.best_effort
                     else ReliabilityPolicy.RELIABLE)
    msg_type = CompressedImage if args.type == 'compressed' else Image
    node.create_subscription(msg_type, args.topic, lambda m: received.append(_summary(m)), qos)
    deadline = time.monotonic() + args.timeout
    try:
        while rclpy.ok() and len(received) < args.count and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.05)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    result = {'messages': received[:max(args.count, 0)],
              'timed_out': len(received) < args.count,
              'domain_id': os.environ.get('ROS_DOMAIN_ID')}
    tmp = Path(args.out + '.tmp')
    tmp.write_text(json.dumps(result), encoding='utf-8')
    tmp.replace(args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
