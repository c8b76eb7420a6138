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

Keep DDS on this machine: ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and a ROS_DOMAIN_ID of its own
are set here if missing; the Fast DDS profile in config/ is used unless one is already set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
os.environ.setdefault('ROS_DOMAIN_ID', '61')
os.environ.setdefault('FASTDDS_DEFAULT_PROFILES_FILE', str(ROOT / 'config' / 'fastdds.xml'))

import rclpy  # noqa: E402  (after the DDS environment above)
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from tqdm import tqdm  # noqa: E402

from malmm_ros.data.sample_stream import panning_frames  # noqa: E402


def _rss_mb(pid: int) -> float:
    for line in Path(f'/proc/{pid}/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
    return float('nan')


def _cpu_model() -> str:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
        if line.startswith('model name'):
            return line.split(':', 1)[1].strip()
    return platform.processor() or 'unknown'


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


def run(args: argparse.Namespace, params: list[str], height: int, width: int) -> int:
    """Start the node with `params`, stream frames into it and print the tables."""
    # 30 distinct frames, cycled: building messages must not slow the publisher down.
    frames = [img for img, _ in panning_frames(30 / args.rate, args.rate, size=(height, width))]
    messages = []
    for img in frames:
        msg = Image(height=height, width=width, encoding='rgb8', is_bigendian=0,
                    step=width * 3, data=img.tobytes())
        msg.header.frame_id = 'bench_camera'
        messages.append(msg)

    cmd = [str(Path(sys.executable).parent / 'malmm-anticipate'), '--ros-args',
           '--params-file', str(ROOT / 'config' / 'anticipate.yaml'),
           '-r', 'image:=/bench/image_raw']
    for extra in params:
        cmd += ['-p', extra]
    node_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
    rclpy.init()
    node = rclpy.create_node('malmm_node_bench')
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    publisher = node.create_publisher(Image, '/bench/image_raw', 10)
    published: dict[int, float] = {}
    arrivals: list[float] = []  # receipt times of the predictions of frames sent here
    end_to_end: list[float] = []
    step_ms: list[float] = []
    diagnostics: dict[str, str] = {}

    def actions_callback(msg: String) -> None:
        data = json.loads(msg.data)
        stamp = data['stamp']['sec'] * 1_000_000_000 + data['stamp']['nanosec']
        if stamp in published:
            arrivals.append(time.perf_counter())
            end_to_end.append((time.perf_counter() - published[stamp]) * 1e3)
            step_ms.append(data['latency_ms']['total'])

    def diagnostics_callback(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith('malmm_anticipate'):
                diagnostics.update({kv.key: kv.value for kv in status.values})

    node.create_subscription(String, 'malmm/actions', actions_callback, 10)
    node.create_subscription(DiagnosticArray, '/diagnostics', diagnostics_callback, 10)
    try:
        deadline = time.monotonic() + 120
        while publisher.get_subscription_count() < 1:
            executor.spin_once(timeout_sec=0.1)
            if node_proc.poll() is not None or time.monotonic() > deadline:
                print(f'ERROR: the node did not start: {node_proc.stderr.read()[-2000:]}')
                return 1
        time.sleep(1.0)
        rss_series = [(0.0, _rss_mb(node_proc.pid))]
        rss_start = float('nan')
        period = 1.0 / args.rate
        count = int((args.warmup + args.seconds) * args.rate)
        start = time.perf_counter()
        for i in tqdm(range(count), desc='publishing', unit='frame'):
            if i % int(5 * args.rate) == 0 and i:
                rss_series.append((i / args.rate, _rss_mb(node_proc.pid)))
            if i == int(args.warmup * args.rate):
                rss_start = _rss_mb(node_proc.pid)
            due = start + i * period
            while (left := due - time.perf_counter()) > 0:
                executor.spin_once(timeout_sec=min(left, 0.005))
            msg = messages[i % len(messages)]
            stamp_ns = time.time_ns()
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
            published[stamp_ns] = time.perf_counter()
            publisher.publish(msg)
        settle = time.monotonic() + 3.0
        while time.monotonic() < settle:
            executor.spin_once(timeout_sec=0.05)
        rss_end = _rss_mb(node_proc.pid)
    finally:
        if node_proc.poll() is None:
            node_proc.send_signal(signal.SIGINT)
            try:
                node_proc.wait(15)
            except subprocess.TimeoutExpired:
                node_proc.kill()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()

    e2e = np.array(end_to_end)
    steps = np.array(step_ms)
    print(f'\n## Node benchmark ({args.warmup:.0f} s warm-up + {args.seconds:.0f} s of '
          f'{width}x{height} rgb8 at {args.rate:.0f} Hz)\n')
    print(f'Machine: {_cpu_model()}, {os.cpu_count()} cores; node parameters: '
          f'config/anticipate.yaml {" ".join(params)}\n')
    print('| published | node frames in | sampled | processed | dropped | predictions |')
    print('|---|---|---|---|---|---|')
    print(f'| {count} | {diagnostics.get("frames_in", "?")} | '
          f'{diagnostics.get("frames_sampled", "?")} | {diagnostics.get("processed", "?")} | '
          f'{diagnostics.get("dropped", "?")} | {len(e2e)} |\n')
    if len(arrivals) > 1:
        rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
        gap = max(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
        print('| /malmm/actions Hz | of the camera rate | longest gap s | in frame periods |')
        print('|---|---|---|---|')
        print(f'| {rate:.2f} | {rate / args.rate:.0%} | {gap:.3f} | {gap * args.rate:.1f} |\n')
    if 'text_requested' in diagnostics:
        print('| descriptions requested | published | dropped (describer busy) | failed | '
              'text latency p50 ms |')
        print('|---|---|---|---|---|')
        print(f'| {diagnostics["text_requested"]} | {diagnostics.get("text_published", "?")} | '
              f'{diagnostics.get("text_dropped_busy", "?")} | '
              f'{diagnostics.get("text_failed", "?")} | '
              f'{diagnostics.get("text_latency_p50_ms", "?")} |\n')
    if len(e2e):
        print('| latency (ms) | p50 | p95 | p99 |')
        print('|---|---|---|---|')
        print('| end-to-end (publish -> /malmm/actions) | '
              + ' | '.join(f'{np.percentile(e2e, q):.1f}' for q in (50, 95, 99)) + ' |')
        print('| pipeline step (node-reported) | '
              + ' | '.join(f'{np.percentile(steps, q):.1f}' for q in (50, 95, 99)) + ' |\n')
    print(f'| node RSS before any frame MB | after {args.warmup:.0f} s warm-up (start) | end | '
          'growth start -> end MB |')
    print('|---|---|---|---|')
    print(f'| {rss_series[0][1]:.1f} | {rss_start:.1f} | {rss_end:.1f} | '
          f'{rss_end - rss_start:+.1f} |\n')
    print('RSS every 5 s (s: MB): ' + ', '.join(f'{t:.0f}: {mb:.1f}' for t, mb in rss_series)
          + '\n')
    if len(e2e):
        overhead = np.percentile(e2e, 50) - np.percentile(steps, 50)
        print(f'Target end-to-end p50 <= step p50 + 5 ms: overhead {overhead:.1f} ms -> '
              f'{"met" if overhead <= 5 else "NOT met"}')
    print(f'Target RSS growth < 5 MB: {rss_end - rss_start:+.1f} MB -> '
          f'{"met" if rss_end - rss_start < 5 else "NOT met"}')
    return 0


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
    with tempfile.TemporaryDirectory() as tmp:
        params = _text_params(args.llm, Path(tmp)) + args.params  # the user's -p come last
        return run(args, params, height, width)


if __name__ == '__main__':
    sys.exit(main())
