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
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from sensor_msgs.msg import Image

from malmm_ros.errors import MalmmError
from malmm_ros.labels import NOUN_CLASSES_FILE, VERB_CLASSES_FILE
from malmm_ros.ros.dds_profile import apply_default_profile
from malmm_ros.ros.node_harness import NodeHarness, NodeRecord, node_command, stop_process
from malmm_ros.stamps import NS_PER_S, stamp_ns

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


def _watch_camera(node: Node) -> dict[int, float]:
    """Subscribe to the camera as the node does; returns stamp_ns -> monotonic receipt time,
    filled as frames arrive."""
    seen: dict[int, float] = {}

    def camera_callback(msg: Image) -> None:
        seen[stamp_ns(msg.header.stamp)] = time.monotonic()

    node.create_subscription(Image, CAMERA_TOPIC, camera_callback, qos_profile_sensor_data)
    return seen


def _prediction_view(harness: NodeHarness) -> Group | Panel:
    latest = harness.latest()
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
    stamp = stamp_ns(latest['stamp']) / NS_PER_S
    latency = latest['latency_ms']
    title = (f'stamp {stamp:.2f}  frames {latest["frames_seen"]}  slots '
             f'{latest["memory_slots"]}  step {latency["total"]:.1f} ms  '
             f'predictions {harness.count()}')
    parts = [Panel(table, title=title)]
    if not latest['model']['trained']:
        parts.insert(0, Panel('[bold yellow]UNTRAINED heads[/]: no checkpoint is configured, so '
                              'these predictions are meaningless. Train one with the EK-100 '
                              'tools and set the "checkpoint" parameter.'))
    return Group(*parts)


def _score(value: float | None, digits: int) -> str:
    return '' if value is None else f'{value:.{digits}f}'


def _summary(record: NodeRecord, end_to_end_ms: np.ndarray, replay_s: float) -> Table:
    d = record.diagnostics
    e2e = end_to_end_ms[~np.isnan(end_to_end_ms)]
    e2e = e2e if len(e2e) else None
    table = Table(title='malmm-demo summary')
    table.add_column('measure')
    table.add_column('value', justify='right')
    rows = [
        ('frames in (node)', d.get('frames_in', '?')),
        ('frames processed', d.get('processed', '?')),
        ('frames dropped (node busy)', d.get('dropped', '?')),
        ('bad frames', d.get('bad_frames', '?')),
        ('memory resets', d.get('resets', '?')),
        ('predictions received', str(len(record.messages))),
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


def _class_files(labels_dir: str | None) -> tuple[Path, Path] | None:
    """The EK-100 verb and noun class CSVs in `labels_dir`, or None if either is missing."""
    if not labels_dir:
        return None
    verbs, nouns = Path(labels_dir) / VERB_CLASSES_FILE, Path(labels_dir) / NOUN_CLASSES_FILE
    return (verbs.resolve(), nouns.resolve()) if verbs.is_file() and nouns.is_file() else None


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _label_parameters(labels_dir: str | None, console: Console) -> list[str]:
    """The node's class-name parameters, or none (and a word on what to do) without them."""
    class_files = _class_files(labels_dir)
    if class_files is not None:
        return [f'labels.verb_classes:={class_files[0]}',
                f'labels.noun_classes:={class_files[1]}']
    where = Path(labels_dir).resolve() if labels_dir else 'no --labels-dir'
    console.print(f'[yellow]EK-100 class names not found ({where}: needs '
                  f'{VERB_CLASSES_FILE} and {NOUN_CLASSES_FILE})[/]: predictions show '
                  'placeholder names (verb_0, noun_0, ...). Point to your annotations with '
                  '`make demo EPIC_ANNOTATIONS=/path/to/epic-kitchens-100-annotations` or '
                  '`malmm-demo --labels-dir DIR`.')
    return []


def _replay(harness: NodeHarness, bag: Path, args: argparse.Namespace, console: Console
            ) -> tuple[float, int | None]:
    """Replay the bag into the started node, showing its predictions as they come; (the replay's
    wall time, its exit code)."""
    console.print(f'starting malmm-anticipate (log: {args.log}) on ROS_DOMAIN_ID='
                  f'{os.environ.get("ROS_DOMAIN_ID", "0")}')
    harness.wait_until(lambda: harness.node.count_subscribers(CAMERA_TOPIC) >= 2,  # its, ours
                       90, f'the node subscribes to {CAMERA_TOPIC}')
    replay_proc = subprocess.Popen([_bin('malmm-replay'), str(bag), '--rate', str(args.rate),
                                    '--topic', CAMERA_TOPIC, '--wait-subscribers', '2'],
                                   stdout=harness.log, stderr=harness.log)
    try:
        start = time.monotonic()
        with Live(_prediction_view(harness), console=console, auto_refresh=False) as live:
            while replay_proc.poll() is None:
                time.sleep(0.25)
                live.update(_prediction_view(harness), refresh=True)
            replay_s = time.monotonic() - start
            harness.settle()  # the last predictions and a fresh diagnostics message
            live.update(_prediction_view(harness), refresh=True)
    finally:
        stop_process(replay_proc)
    return replay_s, replay_proc.returncode


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    console = Console()
    # Child processes inherit it; this process reads it when the watcher's context starts.
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
    command = node_command(args.params_file, remaps=[f'image:={CAMERA_TOPIC}'],
                           params=_label_parameters(args.labels_dir, console))
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    try:
        with NodeHarness(command, log=args.log, watcher='malmm_demo_watch') as harness:
            frame_seen = _watch_camera(harness.node)
            replay_s, replay_code = _replay(harness, bag, args, console)
    except MalmmError as exc:  # the node died or did not start; the message has its log
        console.print(f'ERROR: {exc}', markup=False, highlight=False)
        return 1
    except KeyboardInterrupt:
        return 0
    record = harness.record  # complete: the watcher has stopped
    console.print(_summary(record, record.end_to_end_ms(frame_seen), replay_s))
    if replay_code:
        console.print(f'ERROR: malmm-replay exited with code {replay_code}')
        return 1
    if not record.messages:
        console.print(f'ERROR: no prediction arrived on /malmm/actions; see {args.log}')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
