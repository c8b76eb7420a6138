"""Node benchmark: a 640x480 rgb8 camera at 30 Hz into malmm_anticipate over real DDS.

Starts `malmm-anticipate` (config/anticipate.yaml, so the defaults users get) as a separate
process, publishes real photos (a panning crop over scikit-image images) at 30 Hz for
--seconds, and measures: frames the node received and processed, frames it dropped because
inference was busy, end-to-end latency (publish of a frame to receipt of the /malmm/actions
message stamped with it, both in this process), the pipeline step latency the node reports,
the rate of /malmm/actions and its longest gap, and the node's RSS at start and end. Prints
markdown tables.

    .venv/bin/python bench/node_bench.py [--seconds 60] [--rate 30] [--size 480x640]

With --llm, text descriptions are on (every prediction asks for one) and the tables show what a
busy describer costs /malmm/actions: `--llm random` writes the slow random Llama of
test/ros/test_node_text.py (6 x 384, never ends early, 300 tokens); a folder is any local
causal LM. What that test used to assert (at least 85 % of the camera rate, no gap over four
frame periods) is read here:

    .venv/bin/python bench/node_bench.py --llm random --rate 8 --size 240x320 \
        --params sample_fps:=0.0

Keep DDS on this machine: the node and this process run with ROS_AUTOMATIC_DISCOVERY_RANGE=
LOCALHOST, ROS_DOMAIN_ID 61 unless one is set, and the package's Fast DDS profile unless one is
set (malmm_ros.ros.node_harness starts, watches and stops the node).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from benchlib import machine, rss_mb, table, targets
from sensor_msgs.msg import Image
from tqdm import tqdm

from malmm_ros.data.sample_stream import panning_frames
from malmm_ros.errors import MalmmError
from malmm_ros.ros.node_harness import (
    NodeHarness,
    NodeRecord,
    local_ros_environment,
    node_command,
)

ROOT = Path(__file__).resolve().parents[1]
CAMERA_TOPIC = '/bench/image_raw'
DEFAULT_DOMAIN_ID = '61'
NODE_START_S = 120.0


def _text_params(llm: str | None, tmp: Path) -> list[str]:
    """Node parameters that turn descriptions on for every prediction (none without --llm)."""
    if llm is None:
        return []
    if llm == 'random':
        from malmm_ros.model.tiny_llm import write_tiny_llm
        folder = write_tiny_llm(tmp / 'slow-llama', hidden_size=384, num_layers=6,
                                endless=True)
        return ['text.enabled:=true', f'text.model_path:={folder}',
                'text.every_n_predictions:=1', 'text.max_new_tokens:=300']
    return ['text.enabled:=true', f'text.model_path:={llm}', 'text.every_n_predictions:=1']


@dataclass
class Run:
    """What one run measured."""

    published: int  # frames
    sent_s: dict[int, float]  # stamp ns -> monotonic publish time
    rss_series: list[tuple[float, float]]  # (stream seconds, node RSS MB) every 5 s
    rss_start: float  # after the warm-up
    rss_end: float
    subscribed_s: float  # from spawning the node to its camera subscription matching
    first_publish_s: float  # monotonic time of the first frame


def stream(harness: NodeHarness, args: argparse.Namespace, height: int, width: int,
           spawned_s: float) -> Run:
    """Publish frames into the started node at the camera rate; read its RSS along the way.
    `spawned_s`: monotonic time the node process was started."""
    # 30 distinct frames, cycled: building messages must not slow the publisher down.
    messages = []
    for img, _ in panning_frames(30 / args.rate, args.rate, size=(height, width)):
        msg = Image(height=height, width=width, encoding='rgb8', is_bigendian=0,
                    step=width * 3, data=img.tobytes())
        msg.header.frame_id = 'bench_camera'
        messages.append(msg)
    publisher = harness.node.create_publisher(Image, CAMERA_TOPIC, 10)
    harness.wait_until(lambda: publisher.get_subscription_count() >= 1, NODE_START_S,
                       f'the node subscribes to {CAMERA_TOPIC}')
    subscribed_s = time.monotonic() - spawned_s
    time.sleep(1.0)
    pid = harness.process.pid
    rss_series = [(0.0, rss_mb(pid))]
    rss_start = float('nan')
    sent_s: dict[int, float] = {}
    count = int((args.warmup + args.seconds) * args.rate)
    start = time.monotonic()
    for i in tqdm(range(count), desc='publishing', unit='frame'):
        if i % int(5 * args.rate) == 0 and i:
            rss_series.append((i / args.rate, rss_mb(pid)))
        if i == int(args.warmup * args.rate):
            rss_start = rss_mb(pid)
        time.sleep(max(0.0, start + i / args.rate - time.monotonic()))
        msg = messages[i % len(messages)]
        stamp_ns = time.time_ns()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        sent_s[stamp_ns] = time.monotonic()
        publisher.publish(msg)
    harness.settle()
    return Run(count, sent_s, rss_series, rss_start, rss_mb(pid), subscribed_s, start)


def report(run: Run, record: NodeRecord, args: argparse.Namespace, params: list[str],
           height: int, width: int) -> None:
    """The markdown tables and targets of one run; `record`: what the watcher saw."""
    end_to_end = record.end_to_end_ms(run.sent_s)
    known = ~np.isnan(end_to_end)  # predictions of frames sent here
    e2e = end_to_end[known]
    arrivals = np.asarray(record.received_s)[known]
    steps = np.array([m['latency_ms']['total']
                      for m, sent_here in zip(record.messages, known, strict=True) if sent_here])
    diagnostics = record.diagnostics
    print(f'\n## Node benchmark ({args.warmup:.0f} s warm-up + {args.seconds:.0f} s of '
          f'{width}x{height} rgb8 at {args.rate:.0f} Hz)\n')
    print(machine() + '\n')
    print(f'Node parameters: config/anticipate.yaml {" ".join(params)}\n')
    print(table(['published', 'node frames in', 'sampled', 'processed', 'dropped',
                 'predictions'],
                [[run.published, *(diagnostics.get(key, '?') for key in
                                   ('frames_in', 'frames_sampled', 'processed', 'dropped')),
                  len(e2e)]]) + '\n')
    if len(arrivals) > 1:
        rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
        gap = float(np.max(np.diff(arrivals)))
        print(table(['/malmm/actions Hz', 'of the camera rate', 'longest gap s',
                     'in frame periods'],
                    [[f'{rate:.2f}', f'{rate / args.rate:.0%}', f'{gap:.3f}',
                      f'{gap * args.rate:.1f}']]) + '\n')
    if 'text_requested' in diagnostics:
        print(table(['descriptions requested', 'published', 'dropped (describer busy)',
                     'failed', 'text latency p50 ms'],
                    [[diagnostics['text_requested'], *(diagnostics.get(key, '?') for key in (
                        'text_published', 'text_dropped_busy', 'text_failed',
                        'text_latency_p50_ms'))]]) + '\n')
    if len(e2e):
        print(table(['latency (ms)', 'p50', 'p95', 'p99'],
                    [['end-to-end (publish -> /malmm/actions)',
                      *(f'{np.percentile(e2e, q):.1f}' for q in (50, 95, 99))],
                     ['pipeline step (node-reported)',
                      *(f'{np.percentile(steps, q):.1f}' for q in (50, 95, 99))]]) + '\n')
    growth = run.rss_end - run.rss_start
    print(table(['node RSS before any frame MB', f'after {args.warmup:.0f} s warm-up (start)',
                 'end', 'growth start -> end MB'],
                [[f'{run.rss_series[0][1]:.1f}', f'{run.rss_start:.1f}', f'{run.rss_end:.1f}',
                  f'{growth:+.1f}']]) + '\n')
    if record.received_s:
        # The node's start-up (spawn to subscribed) plus its first frame's way to a prediction;
        # the one second this script waits in between for DDS matching is not the node's.
        first = record.received_s[0] - run.first_publish_s
        print(table(['node start: spawn -> subscribed s', 'first frame -> first prediction s',
                     'start to first prediction s'],
                    [[f'{run.subscribed_s:.2f}', f'{first:.2f}',
                      f'{run.subscribed_s + first:.2f}']]) + '\n')
    print('RSS every 5 s (s: MB): '
          + ', '.join(f'{t:.0f}: {mb:.1f}' for t, mb in run.rss_series) + '\n')
    rows = []
    if len(e2e):
        overhead = np.percentile(e2e, 50) - np.percentile(steps, 50)
        rows.append(('end-to-end p50 <= step p50 + 5 ms', f'overhead {overhead:.1f} ms',
                     overhead <= 5))
    rows.append(('RSS growth after the warm-up < 5 MB', f'{growth:+.1f} MB', growth < 5))
    print(targets(rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seconds', type=float, default=60.0)
    parser.add_argument('--rate', type=float, default=30.0, help='camera rate (Hz)')
    parser.add_argument('--size', default='480x640', help='HxW')
    parser.add_argument('--warmup', type=float, default=10.0,
                        help='seconds published before the start RSS is read (first '
                             'inference allocates its working memory once)')
    parser.add_argument('--params', nargs='*', default=[],
                        help='extra node parameters, e.g. sample_fps:=4.0')
    parser.add_argument('--llm', help="describe every prediction with this local causal LM "
                        "folder, or 'random' for the tests' slow random Llama")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split('x'))
    domain_id = int(os.environ.get('ROS_DOMAIN_ID') or DEFAULT_DOMAIN_ID)
    with tempfile.TemporaryDirectory() as tmp:
        params = _text_params(args.llm, Path(tmp)) + args.params  # the user's -p come last
        command = node_command(ROOT / 'config' / 'anticipate.yaml',
                               remaps=[f'image:={CAMERA_TOPIC}'], params=params)
        spawned_s = time.monotonic()
        try:
            with NodeHarness(command, log=Path(tmp) / 'node.log', watcher='malmm_node_bench',
                             domain_id=domain_id,
                             environment=local_ros_environment(domain_id)) as harness:
                run = stream(harness, args, height, width, spawned_s)
        except MalmmError as exc:
            print(f'ERROR: {exc}')
            return 1
    report(run, harness.record, args, params, height, width)
    return 0


if __name__ == '__main__':
    sys.exit(main())
