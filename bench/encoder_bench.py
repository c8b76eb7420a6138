"""Encoder backends side by side: per-frame latency, and the whole pipeline step with each.

For every backend available here (torch eager, ONNX Runtime CPU; torch CUDA, ONNX Runtime CUDA
and TensorRT where a GPU and the packages exist) and thread counts 1 and 2: batch-1 latency on
real frames after warm-up, timed round-robin so machine noise hits every row alike. Then the
edge pipeline step (encoder + memory + Q-Former + heads, M = 20, bank full) with each backend.

    .venv/bin/python bench/encoder_bench.py [--frames 200] [--steps 100]

Prints markdown tables (docs/PERFORMANCE.md keeps them with the machine they ran on).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from malmm_ros.config import AnticipateConfig, model_preset
from malmm_ros.data.sample_stream import panning_frames
from malmm_ros.errors import MalmmError
from malmm_ros.model.encoder import resize_and_crop
from malmm_ros.pipeline import AnticipationPipeline
from malmm_ros.runtime import create_encoder


def _cpu_model() -> str:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
        if line.startswith('model name'):
            return line.split(':', 1)[1].strip()
    return platform.processor() or 'unknown'


def _candidates() -> list[tuple[str, str, dict]]:
    """(label, backend, options) for every backend that can run here."""
    rows = []
    for threads in (1, 2):
        rows.append((f'torch cpu fp32, {threads} thread(s)', 'torch',
                     {'device': 'cpu', 'threads': threads}))
        rows.append((f'onnxruntime cpu, {threads} thread(s)', 'onnxruntime',
                     {'device': 'cpu', 'threads': threads}))
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


def _time_pipelines(images: list[np.ndarray], steps: int) -> list[tuple[str, dict]]:
    """Median latency parts of the pipeline step (bank full) for each CPU backend, thread count
    and model preset; the rows run interleaved, step by step, so noise hits them alike."""
    setups = []
    for backend in ('onnxruntime', 'torch'):
        for threads in (1, 2):
            setups.append((backend, threads, 'edge'))
    setups.append(('onnxruntime', 2, 'base'))
    pipelines = []
    for backend, threads, preset in setups:
        config = AnticipateConfig().replace(backend=backend, num_threads=threads,
                                            sample_fps=0.0, model=model_preset(preset))
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
    return [(label, {k: statistics.median(v) for k, v in parts.items()})
            for label, _threads, _pipeline, parts in pipelines]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--frames', type=int, default=200, help='timed frames per encoder')
    parser.add_argument('--steps', type=int, default=100, help='timed pipeline steps')
    args = parser.parse_args()
    images = [image for image, _ in panning_frames(8, 4, size=(480, 640))]
    frames = np.stack([resize_and_crop(image) for image in images])

    print(f'Machine: {_cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; '
          f'python {sys.version.split()[0]}\n')
    print('## Encoder alone (batch 1, 224x224, after warm-up)\n')
    print('| backend | median ms | p95 ms | runner |')
    print('|---|---|---|---|')
    rows = _time_encoders(frames, args.frames)
    for label, median, p95, name in rows:
        print(f'| {label} | {median:.2f} | {p95:.2f} | {name} |')
    medians = {label: median for label, median, _, _ in rows}
    for threads in (1, 2):
        ort = medians[f'onnxruntime cpu, {threads} thread(s)']
        eager = medians[f'torch cpu fp32, {threads} thread(s)']
        print(f'ONNX Runtime vs torch eager, {threads} thread(s): {eager / ort:.2f}x faster '
              f'(target >= 2x: {"met" if eager / ort >= 2 else "NOT met"})')
    ort2 = min(medians['onnxruntime cpu, 2 thread(s)'],
               medians['onnxruntime cpu, 2 thread(s), spinning'])
    print(f'ONNX Runtime, 2 threads, best setting: {ort2:.2f} ms (target <= 6 ms: '
          f'{"met" if ort2 <= 6 else "NOT met"})\n')

    print('## Pipeline step (M = 20, bank full), medians in ms\n')
    print('| preset, backend, threads | encoder | memory + Q-Former | heads | total | '
          'total / encoder |')
    print('|---|---|---|---|---|---|')
    for label, parts in _time_pipelines(images, args.steps):
        print(f'| {label} | {parts["encoder"]:.2f} | {parts["memory"]:.2f} | '
              f'{parts["heads"]:.2f} | {parts["total"]:.2f} | '
              f'{parts["total"] / parts["encoder"]:.2f} |')
    print('\nTarget: edge step with the onnxruntime encoder <= 1.5x the encoder alone '
          '(the encoder column includes resize and crop; 1 thread is the default on 2 cores, '
          'num_threads 0 = all cores but one).')
    return 0


if __name__ == '__main__':
    sys.exit(main())
