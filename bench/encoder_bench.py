"""Encoder backends side by side: per-frame latency, and the whole pipeline step with each.

For every backend available here (torch eager, ONNX Runtime CPU fp32 and INT8; torch CUDA, ONNX
Runtime CUDA and TensorRT where a GPU and the packages exist) and thread counts 1 and 2: batch-1
latency on real frames after warm-up, timed round-robin so machine noise hits every row alike.
Then the edge pipeline step (encoder + memory + Q-Former + heads, M = 20, bank full) with each
backend. The INT8 graph is the engine cache's (quantized on the sample photos on first use).

    .venv/bin/python bench/encoder_bench.py [--frames 200] [--steps 100]

Prints markdown tables (docs/PERFORMANCE.md keeps them with the machine they ran on).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
from benchlib import machine, table, targets
from tqdm import tqdm

from malmm_ros.config import AnticipateConfig, model_preset
from malmm_ros.data.sample_stream import panning_frames
from malmm_ros.errors import MalmmError
from malmm_ros.imaging import resize_and_crop
from malmm_ros.pipeline import AnticipationPipeline
from malmm_ros.runtime import create_encoder


def _candidates() -> list[tuple[str, str, dict]]:
    """(label, backend, options) for every backend that can run here."""
    rows = []
    for threads in (1, 2):
        rows.append((f'torch cpu fp32, {threads} thread(s)', 'torch',
                     {'device': 'cpu', 'threads': threads}))
        rows.append((f'onnxruntime cpu, {threads} thread(s)', 'onnxruntime',
                     {'device': 'cpu', 'threads': threads}))
        rows.append((f'onnxruntime cpu int8, {threads} thread(s)', 'onnxruntime',
                     {'device': 'cpu', 'threads': threads, 'precision': 'int8'}))
    rows.append(('onnxruntime cpu, 2 thread(s), spinning', 'onnxruntime-spin',
                 {'device': 'cpu', 'threads': 2}))
    if torch.cuda.is_available():
        rows.append(('torch cuda fp16', 'torch', {'device': 'cuda'}))
        rows.append(('onnxruntime cuda', 'onnxruntime', {'device': 'cuda'}))
        rows.append(('tensorrt fp16', 'tensorrt', {'device': 'cuda', 'precision': 'fp16'}))
    return rows


def _time_encoders(frames: np.ndarray, count: int) -> list[tuple[str, float, float, str]]:
    runners = []
    for label, backend, options in _candidates():
        try:
            if backend == 'onnxruntime-spin':  # idle threads spin: the node never does this
                from malmm_ros.runtime.onnxruntime_encoder import OnnxRuntimeEncoder
                runner = OnnxRuntimeEncoder(threads=options['threads'], spinning=True)
            else:
                runner = create_encoder(backend, **options)
            runners.append((label, runner, options))
        except MalmmError as exc:
            runners.append((label, None, {'why': str(exc).splitlines()[0]}))
    times: dict[str, list[float]] = {label: [] for label, runner, _ in runners if runner}
    for _label, runner, options in runners:  # warm-up
        if runner is not None:
            torch.set_num_threads(options.get('threads') or torch.get_num_threads())
            for i in range(10):
                runner.run(frames[i % len(frames)][None])
    for i in tqdm(range(count), desc='encoders', unit='frame'):
        frame = frames[i % len(frames)][None]
        for label, runner, options in runners:  # round-robin: noise hits every row alike
            if runner is None:
                continue
            if options.get('threads'):
                torch.set_num_threads(options['threads'])
            start = time.perf_counter()
            runner.run(frame)
            times[label].append((time.perf_counter() - start) * 1e3)
    rows = []
    for label, runner, options in runners:
        if runner is None:
            rows.append((label, float('nan'), float('nan'), f'not run: {options["why"]}'))
        else:
            rows.append((label, statistics.median(times[label]),
                         float(np.percentile(times[label], 95)), runner.name))
    return rows


def _time_pipelines(images: list[np.ndarray], steps: int) -> dict[str, dict[str, float]]:
    """Median latency parts of the pipeline step (bank full) for each CPU backend, thread count
    and model preset; the rows run interleaved, step by step, so noise hits them alike."""
    setups = []
    for backend, precision in (('onnxruntime', 'fp32'), ('onnxruntime', 'int8'),
                               ('torch', 'fp32')):
        for threads in (1, 2):
            setups.append((backend, precision, threads, 'edge'))
    setups.append(('onnxruntime', 'fp32', 2, 'base'))
    pipelines = []
    for backend, precision, threads, preset in setups:
        config = AnticipateConfig().replace(backend=backend, precision=precision,
                                            num_threads=threads, sample_fps=0.0,
                                            model=model_preset(preset))
        pipeline = AnticipationPipeline(config)
        label = f'{preset}, {backend} ({pipeline.encoder.name}), {threads} thread(s)'
        pipelines.append((label, threads, pipeline, {'encoder': [], 'memory': [], 'heads': [],
                                                     'total': []}))
    warm = AnticipateConfig().memory_bank_length + 5
    for i in tqdm(range(warm + steps), desc='pipelines', unit='step'):
        for _label, threads, pipeline, parts in pipelines:
            torch.set_num_threads(threads)  # pipelines share torch's global thread pool
            prediction = pipeline.push(images[i % len(images)], i * 1_000_000_000)
            if i >= warm and prediction is not None:
                for key in parts:
                    parts[key].append(prediction.latency_ms[key])
    return {label: {k: statistics.median(v) for k, v in parts.items()}
            for label, _threads, _pipeline, parts in pipelines}


def _targets(medians: dict[str, float], parts: dict[str, dict[str, float]]
             ) -> list[tuple[str, str, bool]]:
    rows = []
    for threads in (1, 2):
        speedup = (medians[f'torch cpu fp32, {threads} thread(s)']
                   / medians[f'onnxruntime cpu, {threads} thread(s)'])
        rows.append((f'ONNX Runtime >= 2x faster than torch eager, {threads} thread(s)',
                     f'{speedup:.2f}x', speedup >= 2))
    for threads in (1, 2):  # the target is at 1 thread; 2 threads for comparison
        ratio = (medians[f'onnxruntime cpu int8, {threads} thread(s)']
                 / medians[f'onnxruntime cpu, {threads} thread(s)'])
        rows.append((f'ONNX Runtime INT8 <= 0.6x fp32, {threads} thread(s)', f'{ratio:.2f}x',
                     ratio <= 0.6))
    best = min(medians['onnxruntime cpu, 2 thread(s)'],
               medians['onnxruntime cpu, 2 thread(s), spinning'])
    rows.append(('ONNX Runtime <= 6 ms, 2 threads, best setting', f'{best:.2f} ms', best <= 6))
    for label, p in parts.items():
        if label.startswith('edge, onnxruntime'):
            ratio = p['total'] / p['encoder']
            rows.append((f'step <= 1.5x the encoder alone ({label})', f'{ratio:.2f}x',
                         ratio <= 1.5))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--frames', type=int, default=200, help='timed frames per encoder')
    parser.add_argument('--steps', type=int, default=100, help='timed pipeline steps')
    args = parser.parse_args()
    images = [image for image, _ in panning_frames(8, 4, size=(480, 640))]
    frames = np.stack([resize_and_crop(image) for image in images])

    print(machine() + '\n')
    print('## Encoder alone (batch 1, 224x224, after warm-up)\n')
    rows = _time_encoders(frames, args.frames)
    print(table(['backend', 'median ms', 'p95 ms', 'runner'],
                [[label, f'{median:.2f}', f'{p95:.2f}', name]
                 for label, median, p95, name in rows]))
    print('\n## Pipeline step (M = 20, bank full), medians in ms\n')
    parts = _time_pipelines(images, args.steps)
    print(table(['preset, backend, threads', 'encoder', 'memory + Q-Former', 'heads', 'total',
                 'total / encoder'],
                [[label, *(f'{p[key]:.2f}' for key in ('encoder', 'memory', 'heads', 'total')),
                  f'{p["total"] / p["encoder"]:.2f}'] for label, p in parts.items()]))
    print('\nThe encoder column includes resize and crop; 1 thread is the default on 2 cores '
          '(num_threads 0 = all cores but one).\n')
    print(targets(_targets({label: median for label, median, _, _ in rows}, parts)))
    return 0


if __name__ == '__main__':
    sys.exit(main())
