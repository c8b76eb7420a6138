#!/usr/bin/env python3
"""Training throughput: optimizer steps on EK-100-shaped windows, per preset and device.

A window is what malmm-train streams for one segment with the defaults: to = 10 s sampled at
1 fps, i.e. 11 frames of 49 x 1280 encoder tokens, through a memory of M = 20 slots. Tokens are
random (the cost does not depend on their values); the step is the real one
(malmm_ros.training.loop: WindowModel forward, cross-entropy on verb/noun/action, backward,
AdamW). Prints windows per second and the implied time for one epoch over the ~67,000 EK-100
training segments.

    .venv/bin/python bench/train_bench.py [--steps 10] [--batch-size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from malmm_ros.config import model_preset
from malmm_ros.data.labels import LabelMaps
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.training.streaming import WindowModel

EK100_TRAIN_SEGMENTS = 67_217  # EPIC_100_train.csv rows (Damen et al., IJCV 2022)
EK100_ACTIONS = 3_806  # (verb, noun) pairs over train and validation (REFERENCE.md)


def time_steps(preset: str, device: torch.device, batch: int, frames: int, memory: int,
               steps: int) -> list[float]:
    torch.manual_seed(0)
    labels = LabelMaps.placeholder().with_actions(
        [(v, n) for v in range(97) for n in range(300)][:EK100_ACTIONS])
    model = MalmmModel(model_preset(preset), labels).to(device).train()
    runner = WindowModel(model, memory)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randn(batch, frames, 49, 1280, device=device)
    times = [float(t) for t in range(frames)]
    target = torch.zeros(batch, dtype=torch.long, device=device)
    out = []
    for i in range(steps + 2):  # two warm-up steps
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = runner(tokens, times)
        loss = sum(torch.nn.functional.cross_entropy(x, target)
                   for x in (logits.verb, logits.noun, logits.action))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        if i >= 2:
            out.append(time.perf_counter() - start)
    return out


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
    print(f'{args.frames} frames per window, M = {args.memory}, batch {args.batch_size}, '
          f'{args.threads} CPU thread(s); median of {args.steps} steps\n')
    print('| preset | device | ms per step | windows / s | one EK-100 epoch (h) |')
    print('|---|---|---|---|---|')
    for device in devices:
        for preset in ('edge', 'base'):
            seconds = statistics.median(time_steps(preset, device, args.batch_size,
                                                   args.frames, args.memory, args.steps))
            rate = args.batch_size / seconds
            print(f'| {preset} | {device.type} | {seconds * 1e3:.0f} | {rate:.1f} | '
                  f'{EK100_TRAIN_SEGMENTS / rate / 3600:.2f} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
