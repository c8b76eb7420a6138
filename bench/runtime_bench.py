"""The edge runtime side by side with the torch reference, one thread, in one run.

From a bundle (`malmm-export bundle`; made here into bench/results/runtime_bundle when none is
given): the encoder (ONNX Runtime fp32 and INT8, torch eager), memory + Q-Former + heads with a
full bank (runtime torch vs runtime onnx, edge preset, M = 20), and the whole pipeline step
(resize, encoder, memory, heads) for runtime torch + fp32 encoder (today's default), runtime onnx
+ fp32 and runtime onnx + INT8. Every row is timed round-robin, frame by frame, so the noise of
this shared machine hits them alike; medians and 95th percentiles in milliseconds.

    .venv/bin/python bench/runtime_bench.py [--bundle DIR] [--frames 300] [--steps 300]

Prints markdown tables and the issue-13 targets (docs/PERFORMANCE.md keeps them with the machine
they ran on). The node's RSS and start-to-first-prediction come from bench/node_bench.py
(--params runtime:=onnx bundle:=DIR).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from benchlib import machine, table, targets
from tqdm import tqdm

from malmm_ros.config import AnticipateConfig
from malmm_ros.data.sample_stream import panning_frames
from malmm_ros.imaging import resize_and_crop
from malmm_ros.model.memory import MemorySpec
from malmm_ros.pipeline import AnticipationPipeline
from malmm_ros.runtime import create_encoder
from malmm_ros.runtime.bundle import Bundle
from malmm_ros.runtime.onnx_step import OnnxStep

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / 'bench' / 'results' / 'runtime_bundle'


def _bundle(path: str | None) -> Bundle:
    if path:
        return Bundle.open(path)
    if (DEFAULT_BUNDLE / 'manifest.json').is_file():
        return Bundle.open(DEFAULT_BUNDLE)
    from malmm_ros.runtime.bundle_export import write_bundle

    print(f'exporting a bundle of the untrained edge model to {DEFAULT_BUNDLE} (once)')
    return write_bundle(DEFAULT_BUNDLE, AnticipateConfig())


def _round_robin(rows: dict[str, Callable[[int], object]], count: int, desc: str
                 ) -> dict[str, list[float]]:
    """ms per call of every row, calls interleaved; each fn gets the call's index."""
    times: dict[str, list[float]] = {label: [] for label in rows}
    for i in tqdm(range(count), desc=desc, unit='call'):
        for label, fn in rows.items():
            start = time.perf_counter()
            fn(i)
            times[label].append((time.perf_counter() - start) * 1e3)
    return times


def _summary(times: dict[str, list[float]], skip: int = 0) -> dict[str, tuple[float, float]]:
    return {label: (statistics.median(t[skip:]), float(np.percentile(t[skip:], 95)))
            for label, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--bundle', default=None, help='bundle folder (default: made once)')
    parser.add_argument('--frames', type=int, default=300, help='timed encoder calls per row')
    parser.add_argument('--steps', type=int, default=300, help='timed steps per row')
    args = parser.parse_args()
    torch.set_num_threads(1)
    bundle = _bundle(args.bundle)
    images = [image for image, _ in panning_frames(40, 1, size=(480, 640))]
    crops = [resize_and_crop(image)[None] for image in images]

    # Encoders, 1 thread.
    encoders = {
        'ONNX Runtime fp32': create_encoder('onnxruntime', threads=1, precision='fp32',
                                            onnx_path=bundle.encoder('fp32')),
        'ONNX Runtime INT8': create_encoder('onnxruntime', threads=1, precision='int8',
                                            onnx_path=bundle.encoder('int8')),
        'torch eager fp32': create_encoder('torch', threads=1),
    }
    for encoder in encoders.values():
        for crop in crops[:5]:
            encoder.run(crop)
    encoder_times = _summary(_round_robin(
        {label: (lambda i, e=encoder: e.run(crops[i % len(crops)]))
         for label, encoder in encoders.items()}, args.frames, 'encoders'))

    # Memory + Q-Former + heads, bank full (M = 20): the same tokens into both.
    config = AnticipateConfig()
    tokens = [encoders['ONNX Runtime fp32'].run(crop) for crop in crops]
    from malmm_ros.model.checkpoint import load_checkpoint

    model = load_checkpoint(bundle.file('checkpoint.safetensors'), config.model)
    memory = model.new_memory(MemorySpec(config.memory_bank_length))
    step = OnnxStep(bundle.file('projection.onnx'), bundle.file('step.onnx'), bundle.spec,
                    config.memory_bank_length, threads=1)

    def torch_step(i: int) -> None:
        with torch.inference_mode():
            queries = model.step(torch.from_numpy(tokens[i % len(tokens)]), float(i), memory)
            logits = model.classify(queries)
            logits.verb.softmax(-1), logits.noun.softmax(-1)

    def onnx_step(i: int) -> None:
        step.step(tokens[i % len(tokens)], float(i))
        step.probabilities()

    warm = config.memory_bank_length + 5
    step_times = _summary(_round_robin({'runtime torch (eager)': torch_step,
                                        'runtime onnx (ONNX Runtime + numpy)': onnx_step},
                                       warm + args.steps, 'memory steps'), skip=warm)

    # Whole pipeline steps (every frame sampled), bank full.
    setups = {'runtime torch, ONNX Runtime fp32 encoder': {'runtime': 'torch',
                                                          'precision': 'fp32'},
              'runtime onnx, fp32 encoder': {'runtime': 'onnx', 'precision': 'fp32'},
              'runtime onnx, INT8 encoder': {'runtime': 'onnx', 'precision': 'int8'}}
    pipelines = {label: AnticipationPipeline(AnticipateConfig().replace(
        num_threads=1, sample_fps=0.0, bundle=str(bundle.path), **options))
        for label, options in setups.items()}
    whole_times = _summary(_round_robin(
        {label: (lambda i, p=pipe: p.push(images[i % len(images)], i * 1_000_000_000))
         for label, pipe in pipelines.items()}, warm + args.steps, 'pipelines'), skip=warm)

    print(machine(threads=1, bundle=bundle.path.name))
    print('\n## Encoder (batch 1, 224 x 224 crop)\n')
    fp32 = encoder_times['ONNX Runtime fp32'][0]
    print(table(['encoder', 'median ms', 'p95 ms', 'x ONNX Runtime fp32'],
                [(label, f'{m:.2f}', f'{p:.2f}', f'{m / fp32:.2f}')
                 for label, (m, p) in encoder_times.items()]))
    print('\n## Memory + Q-Former + heads (edge, M = 20, bank full)\n')
    reference = step_times['runtime torch (eager)'][0]
    print(table(['runtime', 'median ms', 'p95 ms', 'x torch'],
                [(label, f'{m:.3f}', f'{p:.3f}', f'{m / reference:.2f}')
                 for label, (m, p) in step_times.items()]))
    print('\n## Whole step (resize + encoder + memory + heads)\n')
    int8 = encoder_times['ONNX Runtime INT8'][0]
    print(table(['pipeline', 'median ms', 'p95 ms', 'x INT8 encoder alone'],
                [(label, f'{m:.2f}', f'{p:.2f}', f'{m / int8:.2f}')
                 for label, (m, p) in whole_times.items()]))
    onnx_memory = step_times['runtime onnx (ONNX Runtime + numpy)'][0]
    whole = whole_times['runtime onnx, INT8 encoder'][0]
    print()
    print(targets([
        ('INT8 encoder <= 0.6x the fp32 ONNX Runtime encoder (1 thread)',
         f'{int8 / fp32:.2f}x', int8 / fp32 <= 0.6),
        ('memory + Q-Former + heads on onnx <= 1.5 ms (edge, bank full)',
         f'{onnx_memory:.3f} ms ({onnx_memory / reference:.2f}x torch)', onnx_memory <= 1.5),
        ('whole step <= 1.3x the INT8 encoder alone', f'{whole / int8:.2f}x',
         whole / int8 <= 1.3),
    ]))
    return 0


if __name__ == '__main__':
    sys.exit(main())
