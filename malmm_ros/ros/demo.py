"""malmm-demo: write a sample bag, start the node, replay the bag into it, watch the predictions.

What `make demo` runs. Three processes talk over DDS on this machine: malmm-anticipate (the
node), malmm-replay (the bag) and this one, which shows a live top-5 table as malmm/actions
arrives and ends with a summary: frames in, processed, dropped, step and end-to-end latency.
End-to-end latency is measured here as the time from receiving a camera frame to receiving the
prediction stamped with it (both on this machine's loopback).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from sensor_msgs.msg import Image
from std_msgs.msg import String

from malmm_ros.data.labels import NOUN_CLASSES_FILE, VERB_CLASSES_FILE
from malmm_ros.ros.dds_profile import apply_default_profile
from malmm_ros.ros.processes import stop_process

__all__ = ['main']

_REPO_CONFIG = Path(__file__).resolve().parents[2] / 'config' / 'anticipate.yaml'
CAMERA_TOPIC = '/camera/image_raw'


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='malmm-demo', description=__doc__.splitlines()[0])
    parser.add_argument('--bag', default='build/demo_bag', help='sample bag (written if missing)')
    parser.add_argument('--seconds', type=float, default=20.0, help='length of a new bag')
    parser.add_argument('--fps', type=float, default=15.0, help='frame rate of a new bag')
    parser.add_argument('--params-file', default=str(_REPO_CONFIG), help='node parameters')
    parser.add_argument('--labels-dir', default=None,
                        help='EK-100 annotations folder for class names (untrained heads)')
    parser.add_argument('--rate', type=float, default=1.0, help='replay rate')
    parser.add_argument('--log', default='build/demo_node.log', help="the node's output")
    return parser.parse_args(argv)


class _Watcher:
    """Subscribes to the camera, predictions, labels and diagnostics; keeps what it saw."""

    def __init__(self, node: rclpy.node.Node) -> None:
        self.frame_seen: dict[int, float] = {}  # stamp_ns -> monotonic receipt time
        self.latest: dict | None = None
        self.predictions = 0
        self.end_to_end_ms: list[float] = []
        self.diagnostics: dict[str, str] = {}
        self.diagnostic_message = ''
        node.create_subscription(Image, CAMERA_TOPIC, self.camera_callback,
                                 qos_profile_sensor_data)
        node.create_subscription(String, 'malmm/actions', self.actions_callback, 10)
        node.create_subscription(DiagnosticArray, '/diagnostics', self.diagnostics_callback, 10)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.labels: dict | None = None
        node.create_subscription(String, 'malmm/labels', self.labels_callback, latched)

    def camera_callback(self, msg: Image) -> None:
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        self.frame_seen[stamp] = time.monotonic()

    def actions_callback(self, msg: String) -> None:
        self.latest = json.loads(msg.data)
        self.predictions += 1
        stamp = self.latest['stamp']['sec'] * 1_000_000_000 + self.latest['stamp']['nanosec']
        if stamp in self.frame_seen:
            self.end_to_end_ms.append((time.monotonic() - self.frame_seen[stamp]) * 1e3)

    def labels_callback(self, msg: String) -> None:
        self.labels = json.loads(msg.data)

    def diagnostics_callback(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith('malmm_anticipate'):
                self.diagnostics = {kv.key: kv.value for kv in status.values}
                self.diagnostic_message = status.message


def _prediction_view(watcher: _Watcher) -> Group | Panel:
    latest = watcher.latest
    if latest is None:
        return Panel('waiting for the first prediction on /malmm/actions ...')
    table = Table(expand=True)
    for column in ('verb', 'p', 'noun', 'p', 'action', 'p'):
        table.add_column(column, justify='right' if column == 'p' else 'left')
    # The lists are as long as the vocabularies allow (a 2-verb vocabulary has a top-2).
    blank = {'name': '', 'score': None}
    for verb, noun, action in itertools.zip_longest(latest['verb'], latest['noun'],
                                                    latest['action'], fillvalue=blank):
        table.add_row(verb['name'], _score(verb['score'], 3), noun['name'],
                      _score(noun['score'], 3), action['name'], _score(action['score'], 4))
    stamp = latest['stamp']['sec'] + latest['stamp']['nanosec'] * 1e-9
    latency = latest['latency_ms']
    title = (f'stamp {stamp:.2f}  frames {latest["frames_seen"]}  slots '
             f'{latest["memory_slots"]}  step {latency["total"]:.1f} ms  '
             f'predictions {watcher.predictions}')
    parts = [Panel(table, title=title)]
    if not latest['model']['trained']:
        parts.insert(0, Panel('[bold yellow]UNTRAINED heads[/]: no checkpoint is configured, so '
                              'these predictions are meaningless. Train one with the EK-100 '
                              'tools and set the "checkpoint" parameter.'))
    return Group(*parts)


def _score(value: float | None, digits: int) -> str:
    return '' if value is None else f'{value:.{digits}f}'


def _summary(watcher: _Watcher, replay_s: float) -> Table:
    d = watcher.diagnostics
    e2e = np.array(watcher.end_to_end_ms) if watcher.end_to_end_ms else None
    table = Table(title='malmm-demo summary')
    table.add_column('measure')
    table.add_column('value', justify='right')
    rows = [
        ('frames in (node)', d.get('frames_in', '?')),
        ('frames processed', d.get('processed', '?')),
        ('frames dropped (node busy)', d.get('dropped', '?')),
        ('bad frames', d.get('bad_frames', '?')),
        ('memory resets', d.get('resets', '?')),
        ('predictions received', str(watcher.predictions)),
        ('step latency p50 / p95 (ms)',
         f'{d.get("step_latency_p50_ms", "?")} / {d.get("step_latency_p95_ms", "?")}'),
        ('end-to-end latency p50 / p95 (ms)',
         f'{np.percentile(e2e, 50):.1f} / {np.percentile(e2e, 95):.1f}' if e2e is not None
         else 'n/a'),
        ('replay wall time (s)', f'{replay_s:.1f}'),
        ('model trained', d.get('trained', '?')),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def _spin_for(executor: SingleThreadedExecutor, seconds: float) -> None:
    """Handle every callback that arrives for `seconds` (one spin_once handles just one)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        executor.spin_once(timeout_sec=min(left, 0.02))


def _class_files(labels_dir: str | None) -> tuple[Path, Path] | None:
    """The EK-100 verb and noun class CSVs in `labels_dir`, or None if either is missing."""
    if not labels_dir:
        return None
    verbs, nouns = Path(labels_dir) / VERB_CLASSES_FILE, Path(labels_dir) / NOUN_CLASSES_FILE
    return (verbs.resolve(), nouns.resolve()) if verbs.is_file() and nouns.is_file() else None


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    console = Console()
    # Child processes inherit it; this process reads it at rclpy.init below.
    console.print(apply_default_profile())
    bag = Path(args.bag)
    if not bag.exists():
        bag.parent.mkdir(parents=True, exist_ok=True)
        console.print(f'writing sample bag {bag} ({args.seconds:.0f} s at {args.fps:.0f} fps)')
        made = subprocess.run([_bin('malmm-make-bag'), str(bag), '--seconds', str(args.seconds),
                               '--fps', str(args.fps), '--size', '240x320',
                               '--topic', CAMERA_TOPIC], check=False)
        if made.returncode:
            console.print('ERROR: could not write the sample bag')
            return 1

    node_cmd = [_bin('malmm-anticipate'), '--ros-args', '--params-file', args.params_file,
                '-r', f'image:={CAMERA_TOPIC}']
    class_files = _class_files(args.labels_dir)
    if class_files is None:
        where = Path(args.labels_dir).resolve() if args.labels_dir else 'no --labels-dir'
        console.print(f'[yellow]EK-100 class names not found ({where}: needs '
                      f'{VERB_CLASSES_FILE} and {NOUN_CLASSES_FILE})[/]: predictions show '
                      'placeholder names (verb_0, noun_0, ...). Point to your annotations with '
                      '`make demo EPIC_ANNOTATIONS=/path/to/epic-kitchens-100-annotations` or '
                      '`malmm-demo --labels-dir DIR`.')
    else:
        node_cmd += ['-p', f'labels.verb_classes:={class_files[0]}',
                     '-p', f'labels.noun_classes:={class_files[1]}']
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    log = open(args.log, 'w')  # noqa: SIM115 - closed in finally
    node_proc = subprocess.Popen(node_cmd, stdout=log, stderr=subprocess.STDOUT)
    replay_proc: subprocess.Popen | None = None
    rclpy.init()
    watch_node = rclpy.create_node('malmm_demo_watch')
    executor = SingleThreadedExecutor()
    executor.add_node(watch_node)
    watcher = _Watcher(watch_node)
    replay_s = 0.0
    try:
        console.print(f'starting malmm-anticipate (log: {args.log}) on ROS_DOMAIN_ID='
                      f'{os.environ.get("ROS_DOMAIN_ID", "0")}')
        deadline = time.monotonic() + 90
        while watch_node.count_subscribers(CAMERA_TOPIC) < 2:  # the node's and ours
            _spin_for(executor, 0.1)
            if node_proc.poll() is not None:
                console.print(f'ERROR: the node exited with code {node_proc.returncode}; see '
                              f'{args.log}')
                return 1
            if time.monotonic() > deadline:
                console.print('ERROR: the node did not subscribe within 90 s')
                return 1
        replay_proc = subprocess.Popen([_bin('malmm-replay'), str(bag), '--rate',
                                        str(args.rate), '--topic', CAMERA_TOPIC,
                                        '--wait-subscribers', '2'], stdout=log, stderr=log)
        start = time.monotonic()
        with Live(_prediction_view(watcher), console=console, auto_refresh=False) as live:
            while replay_proc.poll() is None:
                _spin_for(executor, 0.25)
                live.update(_prediction_view(watcher), refresh=True)
            replay_s = time.monotonic() - start
            _spin_for(executor, 2.5)  # the last predictions and a fresh diagnostics message
            live.update(_prediction_view(watcher), refresh=True)
        console.print(_summary(watcher, replay_s))
        if replay_proc.returncode:
            console.print(f'ERROR: malmm-replay exited with code {replay_proc.returncode}')
            return 1
        if watcher.predictions == 0:
            console.print(f'ERROR: no prediction arrived on /malmm/actions; see {args.log}')
            return 1
        return 0
    except (KeyboardInterrupt, ExternalShutdownException):
        return 0
    finally:
        if replay_proc is not None:
            stop_process(replay_proc)
        stop_process(node_proc)
        log.close()
        executor.shutdown()
        watch_node.destroy_node()
        rclpy.try_shutdown()


if __name__ == '__main__':
    sys.exit(main())
