#!/usr/bin/env python3
"""Training throughput: optimizer steps on EK-100-shaped windows, per preset and device.

A window is what malmm-train streams for one segment with the defaults: to = 10 s sampled at
1 fps, i.e. 11 frames of 49 x 1280 encoder tokens, through a memory of M = 20 slots. Tokens are
random (the cost does not depend on their values). The step is the training loop's own: the
batches go through malmm_ros.training.anticipation.train with the default settings, and a
step is the time from loading one batch to loading the next (WindowModel forward, the loss on
verb/noun/action, backward, clipping, AdamW, the scheduler and the loop's bookkeeping; bf16
autocast on CUDA, as configured by default). Prints windows per second and the implied time for
one epoch over the ~67,000 EK-100 training segments.

    .venv/bin/python bench/train_bench.py [--steps 10] [--batch-size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from benchlib import machine, table

from malmm_ros.config import model_preset
from malmm_ros.labels import LabelMaps
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.training.anticipation import train
from malmm_ros.training.config import TrainConfig
from malmm_ros.training.windows import WindowSource

EK100_TRAIN_SEGMENTS = 67_217  # EPIC_100_train.csv rows (Damen et al., IJCV 2022)
EK100_ACTIONS = 3_806  # (verb, noun) pairs over train and validation (REFERENCE.md)
WARMUP_STEPS = 2


class TimedWindows(WindowSource):
    """`batches` batches of one random window batch; notes when the loop loads each batch.

    The loop loads a batch right before its forward and copies the batch's top-1 hits to the
    host (a CUDA sync) after its optimizer step, so the gap between two loads is one whole
    step.
    """

    def __init__(self, batches: int, batch: int, frames: int) -> None:
        count = batches * batch
        self.tokens = np.random.default_rng(0).standard_normal((batch, frames, 49, 1280),
                                                               dtype=np.float32)
        self.verbs = self.nouns = self.actions = np.zeros(count, dtype=np.int64)
        self.patterns = [tuple(float(t - frames + 1) for t in range(frames))] * count
        self.loaded_s: list[float] = []

    def load_tokens(self, index: Sequence[int]) -> np.ndarray:
        self.loaded_s.append(time.perf_counter())
        return self.tokens[:len(index)]


def time_steps(preset: str, device: torch.device, batch: int, frames: int, memory: int,
               steps: int) -> list[float]:
    """Seconds of each of `steps` loop steps, after WARMUP_STEPS untimed ones."""
    torch.manual_seed(0)
    labels = LabelMaps.placeholder().with_actions(
        [(v, n) for v in range(97) for n in range(300)][:EK100_ACTIONS])
    model = MalmmModel(model_preset(preset), labels)
    # One more batch than steps: its load ends the last timed step.
    windows = TimedWindows(WARMUP_STEPS + steps + 1, batch, frames)
    config = TrainConfig.from_dict({'device': device.type, 'optim.epochs': 1,
                                    'optim.batch_size': batch})
    train(config, model, windows, capacity=memory, progress=False, save=False)
    return np.diff(windows.loaded_s)[WARMUP_STEPS:].tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--frames', type=int, default=11, help='frames per window (to * fps + 1)')
    parser.add_argument('--memory', type=int, default=20)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = [torch.device('cpu')] + ([torch.device('cuda')] if torch.cuda.is_available()
                                       else [])
    print(machine(torch_threads=args.threads) + '\n')
    print(f'{args.frames} frames per window, M = {args.memory}, batch {args.batch_size}; '
          f'median of {args.steps} steps\n')
    rows = []
    for device in devices:
        for preset in ('edge', 'base'):
            seconds = statistics.median(time_steps(preset, device, args.batch_size,
                                                   args.frames, args.memory, args.steps))
            rate = args.batch_size / seconds
            rows.append([preset, device.type, f'{seconds * 1e3:.0f}', f'{rate:.1f}',
                         f'{EK100_TRAIN_SEGMENTS / rate / 3600:.2f}'])
    print(table(['preset', 'device', 'ms per step', 'windows / s', 'one EK-100 epoch (h)'],
                rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
