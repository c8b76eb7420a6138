"""Streaming benchmark: per-step latency and memory of the MA-LMM pipeline over long streams.

What it measures (edge preset, memory capacity M = 10 and 20, CPU):

- the image encoder: the real torch EfficientNet-Lite0 (pretrained weights), batch 1, after
  warm-up, on ~100 camera-like frames (`panning_frames` over scikit-image photos, resized with
  `resize_and_crop`); its cost does not depend on the frame index, so its median is reused;
- memory + Q-Former (`MalmmModel.step` under `torch.inference_mode`, untrained weights from a
  fixed seed) and the heads (`MalmmModel.classify` on the same step), driven with the encoder's
  real tokens cycled over the whole stream, one sampled frame per second of stream time
  (now_s = frame index); every step is timed and the medians of the 50 steps ending at frames
  100, 1,000 and 10,000 are reported; total = encoder median + memory median + heads median;
- RSS (VmRSS of /proc/self/status, after gc.collect()) at frames 100, 1,000 and 10,000;
- rows: M = 10 cached, M = 20 cached, M = 20 `recompute` (what the public MA-LMM code does:
  every stored frame's key/value projections are recomputed each step) and the no-compression
  baseline that keeps every frame (run to --baseline-frames only: its cost grows linearly, the
  10,000-frame figures are extrapolated from the measured slope);
- side by side (interleaved steps, so machine noise hits both sides alike): the memory at
  frame ~100 (a snapshot) against the same stream at frame ~10,000; the whole pipeline in its
  real order (encoder, step, heads) for edge M = 20; and at blip2 size (12 layers, width 768,
  cross-attention input 1408), M = 20, cached against recompute once the bank is full; and
  the time representations of the memory (the default order bias, the optional age code, the
  model before issue 12), edge M = 20 (`--time-cost-only` runs just these, a few minutes).

Targets are printed as met / not met; nothing is asserted. Output: markdown tables on stdout,
progress bars on stderr. Run from the repository root (about 10-20 minutes on 2 CPU cores):

    .venv/bin/python bench/stream_bench.py            # or: make bench
    .venv/bin/python bench/stream_bench.py --quick    # smoke run, under a minute or two
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from benchlib import fmt, load_average, machine, rss_mb, table, targets
from skimage import data as skdata
from tqdm import tqdm

from malmm_ros.config import model_preset
from malmm_ros.data.sample_stream import panning_frames
from malmm_ros.imaging import resize_and_crop
from malmm_ros.labels import LabelMaps
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.model.memory import MemorySpec, StreamMemory
from malmm_ros.runtime.torch_encoder import TorchEncoder

SEED = 0
WINDOW = 50  # steps per latency window (the window ends at the checkpoint frame)
CHECKPOINTS = (100, 1_000, 10_000)
PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'immunohistochemistry',
          'hubble_deep_field', 'retina')

# Targets from the issue.
TARGET_TOTAL_OVER_ENCODER = 2.0
TARGET_TIME_COST = 1.10  # issue 12: a step may grow by at most 10 %
# The time representations timed side by side: name -> edge model overrides. The first is the
# default; every ratio is to the last, the model before issue 12 (age-bucket bias only).
TIME_VARIANTS = {
    'order bias + value decays (default)': {},
    'order bias + value decays after the values (decay_channels extra)': {
        'decay_channels': 'extra'},
    'order bias only (value_decays 0)': {'value_decays': 0},
    'order bias + age code (time_features 16, value_decays 0)': {'time_features': 16,
                                                                 'value_decays': 0},
    'before issue 12 (bucket bias only)': {'order_bias': False, 'value_decays': 0},
}
TARGET_DRIFT = 1.05
TARGET_RSS_GROWTH_MB = 5.0
TARGET_BLIP2_SPEEDUP = 5.0


# -- helpers ---------------------------------------------------------------------------------


def ms(seconds: float) -> float:
    return seconds * 1e3


def window_median(values: np.ndarray, end_frame: int) -> float:
    """Median of the WINDOW values ending at 1-based frame `end_frame`."""
    start = max(0, end_frame - WINDOW)
    return float(np.median(values[start:end_frame]))


def build_model(preset: str, **options: int) -> MalmmModel:
    """An untrained MalmmModel of `preset`, weights from a fixed seed, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = MalmmModel(model_preset(preset), LabelMaps.placeholder(), **options)
    return model.eval()


def timed_step(model: MalmmModel, tokens: torch.Tensor, now_s: float,
               memory: StreamMemory) -> tuple[float, float]:
    """One model step and its heads: (step seconds, heads seconds)."""
    start = time.perf_counter()
    queries = model.step(tokens, now_s, memory)
    stepped = time.perf_counter()
    model.classify(queries)
    return stepped - start, time.perf_counter() - stepped


# -- measurements ----------------------------------------------------------------------------


@dataclass
class EncoderResult:
    tokens: list[torch.Tensor]
    encoder_ms: np.ndarray
    crop_ms: np.ndarray


def bench_encoder(frames: int, warmup: int) -> tuple[TorchEncoder, list[np.ndarray],
                                                      EncoderResult]:
    """Time the real encoder per frame (batch 1) after warm-up; keep the tokens it made.

    resize_and_crop is timed too, on full-size photo windows (information only: the pipeline
    reports it apart from the encoder).
    """
    # Each photo in turn, panned over for an equal share of the frames.
    crops = [resize_and_crop(image) for image, _ in panning_frames(
        frames, 1.0, scenes=PHOTOS, seconds_per_scene=math.ceil(frames / len(PHOTOS)))]
    photo = skdata.astronaut()
    crop_ms = []
    for _ in range(20):
        start = time.perf_counter()
        resize_and_crop(photo)
        crop_ms.append(ms(time.perf_counter() - start))

    encoder = TorchEncoder('cpu')
    for crop in crops[:warmup]:
        encoder.run(crop[None])
    tokens, times = time_encoder(encoder, crops, 'encoder')
    return encoder, crops, EncoderResult(tokens, times, np.asarray(crop_ms))


def time_encoder(encoder: TorchEncoder, crops: list[np.ndarray], desc: str
                 ) -> tuple[list[torch.Tensor], np.ndarray]:
    """One timed pass of the encoder over `crops`, batch 1: (tokens, ms per frame)."""
    tokens, times = [], []
    for crop in tqdm(crops, desc=desc, unit='frame', mininterval=2):
        start = time.perf_counter()
        out = encoder.run(crop[None])
        times.append(ms(time.perf_counter() - start))
        tokens.append(torch.from_numpy(out))
    return tokens, np.asarray(times)


@dataclass
class StreamResult:
    name: str
    frames: int
    step_ms: np.ndarray
    heads_ms: np.ndarray
    rss_mb: dict[int, float] = field(default_factory=dict)
    bank_mb: dict[int, float] = field(default_factory=dict)
    drift: tuple[float, float] | None = None  # side by side: (step ms at ~100, at ~end)


def run_stream(name: str, model: MalmmModel, memory: StreamMemory, tokens: list[torch.Tensor],
               frames: int, checkpoints: list[int], snapshot_at: int | None) -> StreamResult:
    """Drive `memory` for `frames` steps (now_s = frame index), timing each step.

    With `snapshot_at`, the memory is copied after that frame and, at the end, WINDOW steps of
    the copy (frame ~snapshot_at) and of the live memory (frame ~frames) are interleaved.
    """
    step_ms = np.zeros(frames)
    heads_ms = np.zeros(frames)
    result = StreamResult(name, frames, step_ms, heads_ms)
    snapshot = None
    with torch.inference_mode():
        for index in tqdm(range(frames), desc=name, unit='step', mininterval=2):
            step, heads = timed_step(model, tokens[index % len(tokens)], float(index), memory)
            step_ms[index], heads_ms[index] = ms(step), ms(heads)
            frame = index + 1
            if frame == snapshot_at:
                snapshot = copy.deepcopy(memory)
            if frame in checkpoints:
                result.rss_mb[frame] = rss_mb()
                result.bank_mb[frame] = memory.nbytes() / 2**20
        if snapshot is not None and snapshot_at is not None:
            early, late = side_by_side(model, tokens, (snapshot, snapshot_at),
                                       (memory, frames), WINDOW, f'{name} side by side')
            result.drift = (float(np.median(early)), float(np.median(late)))
    return result


def side_by_side(model: MalmmModel, tokens: list[torch.Tensor],
                 first: tuple[StreamMemory, int], second: tuple[StreamMemory, int],
                 steps: int, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Interleave `steps` steps of two memories, each continuing from its next frame index.

    The order alternates every pair so that neither side always runs on warm caches.
    Returns the step times (ms) of each side.
    """
    times: tuple[list[float], list[float]] = ([], [])
    sides = (first, second)
    with torch.inference_mode():
        for pair in tqdm(range(steps), desc=desc, unit='pair', mininterval=2):
            order = (0, 1) if pair % 2 == 0 else (1, 0)
            for side in order:
                memory, next_index = sides[side]
                index = next_index + pair
                step, _ = timed_step(model, tokens[index % len(tokens)], float(index), memory)
                times[side].append(ms(step))
    return np.asarray(times[0]), np.asarray(times[1])


def time_cost(tokens: list[torch.Tensor], capacity: int, steps: int) -> dict[str, np.ndarray]:
    """Step ms of edge M = capacity for each of TIME_VARIANTS, interleaved (the order rotates
    every step) once the banks are full. Same seed, so all share every other weight."""
    def build(**change: int | bool) -> MalmmModel:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            return MalmmModel(model_preset('edge', **change), LabelMaps.placeholder()).eval()

    models = [build(**change) for change in TIME_VARIANTS.values()]
    memories = [model.new_memory(MemorySpec(capacity)) for model in models]
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for index in tqdm(range(capacity + 1 + steps), desc='time representations',
                          unit='step', mininterval=2):
            for turn in range(len(models)):
                side = (index + turn) % len(models)
                step, _ = timed_step(models[side], tokens[index % len(tokens)], float(index),
                                     memories[side])
                if index > capacity:
                    times[side].append(ms(step))
    return {name: np.asarray(t) for name, t in zip(TIME_VARIANTS, times, strict=True)}


def time_cost_table(cost: dict[str, np.ndarray], encoder_ms: float) -> str:
    """Median step ms of each time representation, its ratio to the model before issue 12,
    alone and with the encoder median added (the whole per-frame step)."""
    medians = {name: float(np.median(t)) for name, t in cost.items()}
    before = medians[list(TIME_VARIANTS)[-1]]
    return table(['time representation', 'memory + Q-Former ms', 'ratio', 'ratio with encoder'],
                 [[name, fmt(value), fmt(value / before, 3),
                   fmt((encoder_ms + value) / (encoder_ms + before), 3)]
                  for name, value in medians.items()])


def time_cost_ratio(cost: dict[str, np.ndarray]) -> float:
    """The default's memory + Q-Former step over the model before issue 12 (medians)."""
    names = list(TIME_VARIANTS)
    return float(np.median(cost[names[0]])) / float(np.median(cost[names[-1]]))


def pipeline_order(model: MalmmModel, encoder: TorchEncoder, crops: list[np.ndarray],
                   capacity: int, steps: int) -> dict[str, np.ndarray]:
    """Encoder, step and heads per frame in the pipeline's order, after the bank is full."""
    memory = model.new_memory(MemorySpec(capacity))
    times: dict[str, list[float]] = {'encoder': [], 'memory': [], 'heads': [], 'total': []}
    with torch.inference_mode():
        for index in tqdm(range(capacity + 1 + steps), desc='pipeline order', unit='frame',
                          mininterval=2):
            start = time.perf_counter()
            tokens = torch.from_numpy(encoder.run(crops[index % len(crops)][None]))
            encoded = time.perf_counter()
            step, heads = timed_step(model, tokens, float(index), memory)
            if index > capacity:
                times['encoder'].append(ms(encoded - start))
                times['memory'].append(ms(step))
                times['heads'].append(ms(heads))
                times['total'].append(ms(encoded - start + step + heads))
    return {key: np.asarray(value) for key, value in times.items()}


def bench_blip2(tokens: list[torch.Tensor], capacity: int, steps: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """blip2-size model, M = capacity: cached and recompute steps interleaved once full.

    The tokens' count sets the frame size: 49 for our EfficientNet-Lite0, 257 for BLIP-2's
    own EVA-CLIP ViT-g frame.
    """
    model = build_model('blip2', num_tokens=tokens[0].shape[1])
    cached = model.new_memory(MemorySpec(capacity))
    recompute = model.new_memory(MemorySpec(capacity, cache_projections=False))
    with torch.inference_mode():
        for index in tqdm(range(capacity + 1), desc='blip2 fill', unit='step', mininterval=2):
            for memory in (cached, recompute):
                model.step(tokens[index % len(tokens)], float(index), memory)
    return side_by_side(model, tokens, (cached, capacity + 1), (recompute, capacity + 1),
                        steps, 'blip2 timed')


def frame_bytes(model: MalmmModel, tokens: list[torch.Tensor]) -> float:
    """Bank bytes per frame kept without compression: a fresh bank filled to its first
    allocation (16 slots; it then doubles), divided by 16."""
    memory = model.new_memory(MemorySpec(None))
    with torch.inference_mode():
        for index in range(16):
            model.step(tokens[index % len(tokens)], float(index), memory)
    return memory.nbytes() / 16


def baseline_slope(result: StreamResult) -> tuple[float, float]:
    """Slope and intercept (ms per frame, ms) of step time against frame index.

    A Theil-Sen fit (median of the pairwise slopes) over the 10th percentile of each 50-step
    window: a window that ran while other processes held the cores does not tilt it.
    """
    ends = list(range(2 * WINDOW, result.frames + 1, WINDOW))
    if len(ends) < 2:
        return math.nan, math.nan
    lows = np.asarray([np.percentile(result.step_ms[end - WINDOW:end], 10) for end in ends])
    centres = np.asarray(ends, dtype=float) - WINDOW / 2
    pairs = [(j, i) for i in range(len(ends)) for j in range(i)]
    slope = float(np.median([(lows[i] - lows[j]) / (centres[i] - centres[j]) for j, i in pairs]))
    intercept = float(np.median(lows - slope * centres))
    return slope, intercept


@dataclass(frozen=True)
class Plan:
    """Stream lengths and the frames at which latency windows end and RSS is read."""

    frames: int
    baseline_frames: int
    encoder_frames: int
    blip2_steps: int
    quick: bool
    skip_blip2: bool

    @property
    def checkpoints(self) -> list[int]:
        return sorted({c for c in CHECKPOINTS if c < self.frames} | {self.frames})

    @property
    def base_points(self) -> list[int]:
        return sorted({c for c in CHECKPOINTS if c < self.baseline_frames}
                      | {self.baseline_frames})

    @property
    def far(self) -> int:
        """The frame the baseline is extrapolated to when it stops earlier."""
        return max(CHECKPOINTS[-1], self.frames)


@dataclass
class Measurements:
    encoder: EncoderResult
    encoder_again_ms: np.ndarray  # a second encoder pass, after the memory rows
    runs: list[StreamResult]  # the bounded-memory rows
    baseline: StreamResult  # no compression
    order: dict[str, np.ndarray]  # pipeline order, per part
    time_cost: dict[str, np.ndarray]  # step ms per time representation (TIME_VARIANTS)
    bytes_per_frame: float  # of the baseline's bank
    blip2: list[tuple[str, float, float]]  # (tokens per frame, cached ms, recompute ms)

    @property
    def encoder_median(self) -> float:
        """The lower of the two passes' medians: a burst of load from other processes during
        one pass shows up as a gap between them."""
        return min(float(np.median(t)) for t in (self.encoder.encoder_ms, self.encoder_again_ms))


# -- measurements, in the order they run ------------------------------------------------------


def measure(plan: Plan) -> Measurements:
    encoder, crops, enc = bench_encoder(plan.encoder_frames, warmup=10)
    # Bounded-memory rows, then the baseline (it leaves the biggest heap behind).
    edge = build_model('edge')
    runs: list[StreamResult] = []
    for name, capacity, cache in (('edge M=10 cached', 10, True),
                                  ('edge M=20 cached', 20, True),
                                  ('edge M=20 recompute', 20, False)):
        memory = edge.new_memory(MemorySpec(capacity, cache_projections=cache))
        runs.append(run_stream(name, edge, memory, enc.tokens, plan.frames, plan.checkpoints,
                               snapshot_at=plan.checkpoints[0]))
        del memory
    order = pipeline_order(edge, encoder, crops, 20, steps=30 if plan.quick else 100)
    time_costs = time_cost(enc.tokens, 20, steps=60 if plan.quick else 400)
    base_memory = edge.new_memory(MemorySpec(None))
    baseline = run_stream('edge no compression', edge, base_memory, enc.tokens,
                          plan.baseline_frames, plan.base_points, snapshot_at=None)
    del base_memory
    bytes_per_frame = frame_bytes(edge, enc.tokens)
    gc.collect()
    _, encoder_again = time_encoder(encoder, crops, 'encoder again')
    blip2 = []
    if not plan.skip_blip2:
        generator = torch.Generator().manual_seed(SEED)
        eva_tokens = [torch.randn(1, 257, enc.tokens[0].shape[2], generator=generator)
                      for _ in range(4)]
        for label, frame_tokens in (('49 (EfficientNet-Lite0 frame)', enc.tokens),
                                    ('257 (EVA-CLIP ViT-g frame, as in BLIP-2)', eva_tokens)):
            cached_ms, recompute_ms = bench_blip2(frame_tokens, 20, plan.blip2_steps)
            blip2.append((label, float(np.median(cached_ms)), float(np.median(recompute_ms))))
    return Measurements(enc, encoder_again, runs, baseline, order, time_costs, bytes_per_frame,
                        blip2)


# -- report -----------------------------------------------------------------------------------


def report_encoder(m: Measurements) -> None:
    passes = (m.encoder.encoder_ms, m.encoder_again_ms)
    print('\n## Encoder (torch EfficientNet-Lite0, pretrained, fp32, batch 1)\n')
    print(table(['pass', 'frames timed', 'median ms', 'p10 ms', 'p90 ms'],
                [[label, len(times), fmt(float(np.median(times))),
                  fmt(float(np.percentile(times, 10))), fmt(float(np.percentile(times, 90)))]
                 for label, times in zip(('first (before the memory rows)',
                                          'second (after the baseline)'), passes,
                                         strict=True)]))
    print(f'\nencoder ms below: {fmt(m.encoder_median)} (the lower of the two medians). '
          f'resize_and_crop (before the encoder, not counted in its time): '
          f'{fmt(float(np.median(m.encoder.crop_ms)))} ms on a 512x512 photo.')


def report_latency(plan: Plan, m: Measurements) -> None:
    first = plan.checkpoints[0]
    enc_median = m.encoder_median
    rows = []
    for run in [*m.runs, m.baseline]:
        reference = window_median(run.step_ms, first)
        for point in (plan.base_points if run is m.baseline else plan.checkpoints):
            step = window_median(run.step_ms, point)
            heads = window_median(run.heads_ms, point)
            total = enc_median + step + heads
            low = float(np.percentile(run.step_ms[max(0, point - WINDOW):point], 10))
            rows.append([run.name, f'{point:,}', fmt(enc_median), fmt(step), fmt(low),
                         fmt(heads), fmt(total), fmt(total / enc_median),
                         fmt(step / reference)])
    slope, intercept = baseline_slope(m.baseline)
    if plan.baseline_frames < plan.far:
        projected = intercept + slope * plan.far
        rows.append([m.baseline.name, f'{plan.far:,}', 'not run', f'not run (grows linearly: '
                     f'+{fmt(slope * 1000)} ms per 1,000 frames, ~{fmt(projected, 0)} ms '
                     f'extrapolated)', '', '', '', '', ''])
        rows[-1][3] += ' (Theil-Sen fit over the p10 of each window)'
    print('\n## Per-step latency (median of the 50 steps ending at each frame)\n')
    print(table(['config', 'frame', 'encoder ms', 'memory + Q-Former ms', '(p10 ms)',
                 'heads ms', 'total ms', 'total / encoder', f'memory step / at {first:,}'],
                rows))
    print('\nencoder ms is the encoder median above (its cost does not depend on the frame '
          'index); memory + Q-Former is MalmmModel.step (adapter, banks, Q-Former), median and '
          '10th percentile of the window (a median far above its p10 means the window ran '
          'while other processes held the cores); heads is MalmmModel.classify on the same '
          'step.')


def report_memory(plan: Plan, m: Measurements) -> None:
    columns = sorted(set(plan.checkpoints) | set(plan.base_points))
    rows = []
    for run in [*m.runs, m.baseline]:
        points = sorted(run.rss_mb)
        growth = run.rss_mb[points[-1]] - run.rss_mb[points[-2]] if len(points) > 1 else math.nan
        cells = [fmt(run.rss_mb[c], 1) if c in run.rss_mb else 'not run' for c in columns]
        rows.append([run.name, *cells, f'{fmt(growth, 1)} ({points[-2]:,} -> {points[-1]:,})'
                     if len(points) > 1 else 'n/a', fmt(run.bank_mb[points[-1]], 2)])
    print('\n## Memory (RSS of the whole process, after gc.collect())\n')
    print(table(['config', *[f'RSS MB at {c:,}' for c in columns], 'RSS growth MB',
                 'bank MB (last frame)'], rows))
    if plan.baseline_frames < plan.far:
        far = plan.far
        slope, intercept = baseline_slope(m.baseline)
        print(f'\n{m.baseline.name} at {far:,} frames: not run (grows linearly: '
              f'{fmt(m.bytes_per_frame / 1024, 0)} kB of bank storage per frame kept, '
              f'~{fmt(m.bytes_per_frame * far / 2**30, 1)} GB extrapolated, more as its storage '
              f'doubles, and '
              f'~{fmt(intercept + slope * far, 0)} ms per step). The baseline attends over every '
              'frame it has seen, so both its step time and its memory grow with every frame.')
    print('\nAll rows run in one process, one after the other, so absolute RSS includes what '
          'earlier rows left behind; the growth within a row is what matters.')


def report_side_by_side(plan: Plan, m: Measurements) -> None:
    first, last = plan.checkpoints[0], plan.checkpoints[-1]
    print(f'\n## Side by side (interleaved steps, {WINDOW} each)\n')
    rows = []
    for run in m.runs:
        assert run.drift is not None
        rows.append([run.name, fmt(run.drift[0]), fmt(run.drift[1]),
                     fmt(run.drift[1] / run.drift[0], 3)])
    print(table(['config', f'step ms at frame ~{first:,}', f'step ms at frame ~{last:,}',
                 'ratio'], rows))
    order_enc = float(np.median(m.order['encoder']))
    order_total = float(np.median(m.order['total']))
    print(f'\nPipeline order (edge M=20 cached, {len(m.order["total"])} frames after the bank '
          'is full: encoder, step, heads per frame):\n')
    print(table(['encoder ms', 'memory + Q-Former ms', 'heads ms', 'total ms',
                 'total / encoder'],
                [[fmt(order_enc), fmt(float(np.median(m.order['memory']))),
                  fmt(float(np.median(m.order['heads']))), fmt(order_total),
                  fmt(order_total / order_enc)]]))
    steps = len(next(iter(m.time_cost.values())))
    print(f'\nTime representations (edge M=20, {steps} interleaved steps each, bank full):\n')
    print(time_cost_table(m.time_cost, m.encoder_median))
    if m.blip2:
        print(f'\n## blip2 size, M = 20 ({plan.blip2_steps} interleaved steps each, frames '
              f'22..{21 + plan.blip2_steps}, bank full)\n')
        print(table(['tokens per frame', 'cached ms', 'recompute ms', 'speedup'],
                    [[label, fmt(cached, 1), fmt(recompute, 1), fmt(recompute / cached)]
                     for label, cached, recompute in m.blip2]))


def report_targets(plan: Plan, m: Measurements) -> None:
    checkpoints = plan.checkpoints
    first, last = checkpoints[0], checkpoints[-1]
    rss_from = checkpoints[-2] if len(checkpoints) > 1 else first
    m20 = next(run for run in m.runs if run.name == 'edge M=20 cached')
    window_total = (m.encoder_median + window_median(m20.step_ms, last)
                    + window_median(m20.heads_ms, last))
    order_ratio = float(np.median(m.order['total'])) / float(np.median(m.order['encoder']))
    rows = [(f'total step <= {TARGET_TOTAL_OVER_ENCODER:g}x encoder (edge M=20, torch encoder)',
             f'{fmt(order_ratio)}x side by side; {fmt(window_total / m.encoder_median)}x '
             f'from the medians at frame {last:,}', order_ratio <= TARGET_TOTAL_OVER_ENCODER)]
    for run in m.runs:
        assert run.drift is not None
        side = run.drift[1] / run.drift[0]
        windows = window_median(run.step_ms, last) / window_median(run.step_ms, first)
        rows.append((f'step at {last:,} / at {first:,} <= {TARGET_DRIFT:g} ({run.name})',
                     f'{fmt(side, 3)} side by side; {fmt(windows, 3)} from the windows',
                     side <= TARGET_DRIFT))
    for run in m.runs:
        growth = run.rss_mb[last] - run.rss_mb[rss_from]
        rows.append((f'RSS growth {rss_from:,} -> {last:,} frames <= {TARGET_RSS_GROWTH_MB:g} MB '
                     f'({run.name})', f'{fmt(growth, 1)} MB', growth <= TARGET_RSS_GROWTH_MB))
    ratio = time_cost_ratio(m.time_cost)
    rows.append((f'memory + Q-Former step with the order bias <= {TARGET_TIME_COST:g}x the model '
                 'before issue 12 (edge M=20)', f'{fmt(ratio, 3)}x', ratio <= TARGET_TIME_COST))
    if m.blip2:
        _, cached, recompute = m.blip2[-1]  # judged at BLIP-2's own frame size
        rows.append((f'cached >= {TARGET_BLIP2_SPEEDUP:g}x faster than recompute (blip2, M=20, '
                     '257 tokens per frame)', f'{fmt(recompute / cached)}x',
                     recompute / cached >= TARGET_BLIP2_SPEEDUP))
    print('\n' + targets(rows))
    print('\nThe side-by-side ratios decide the verdicts: both sides were timed interleaved, so '
          'load from other processes affects them alike.')


def time_cost_only(encoder_frames: int, steps: int = 400) -> None:
    """The time representations' cost and its target on their own: encoder median, then the
    side by side."""
    _, _, enc = bench_encoder(encoder_frames, warmup=10)
    cost = time_cost(enc.tokens, 20, steps)
    encoder_ms = float(np.median(enc.encoder_ms))
    print(f'\nTime representations (edge M=20, {steps} interleaved steps each, bank full; '
          f'torch encoder median {fmt(encoder_ms)} ms):\n')
    print(time_cost_table(cost, encoder_ms))
    ratio = time_cost_ratio(cost)
    print(f'\nDefault memory + Q-Former step <= {TARGET_TIME_COST:g}x the model before issue '
          f'12: {fmt(ratio, 3)}x, {"met" if ratio <= TARGET_TIME_COST else "NOT MET"}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--frames', type=int, default=10_000,
                        help='stream length for the bounded-memory rows (default 10000)')
    parser.add_argument('--baseline-frames', type=int, default=1_000,
                        help='stream length for the no-compression baseline (default 1000)')
    parser.add_argument('--encoder-frames', type=int, default=100,
                        help='camera frames timed through the encoder (default 100)')
    parser.add_argument('--blip2-steps', type=int, default=20,
                        help='timed blip2 steps per variant once the bank is full (default 20)')
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: 300 frames, baseline 300, 5 blip2 steps')
    parser.add_argument('--skip-blip2', action='store_true', help='skip the blip2-size rows')
    parser.add_argument('--time-cost-only', action='store_true',
                        help='only the encoder and the time representations side by side (a '
                             'few minutes)')
    parser.add_argument('--dump', metavar='NPZ', default='',
                        help='also save every step time (ms) of every row to this .npz file')
    args = parser.parse_args()
    if args.quick:
        args.frames, args.baseline_frames, args.blip2_steps = 300, 300, 5
    if args.frames < WINDOW or args.baseline_frames < WINDOW:
        parser.error(f'--frames and --baseline-frames must be at least {WINDOW}')
    plan = Plan(args.frames, args.baseline_frames, args.encoder_frames, args.blip2_steps,
                args.quick, args.skip_blip2)

    print('# malmm_ros streaming benchmark\n')
    print(f'Run {time.strftime("%Y-%m-%d %H:%M")}: frames {plan.frames}, baseline frames '
          f'{plan.baseline_frames}, latency windows of {WINDOW} steps ending at frames '
          f'{", ".join(f"{c:,}" for c in plan.checkpoints)}.\n')
    print(f'Load average at start: {load_average()}.\n')
    print('## Machine\n')
    print(machine(torch_threads=torch.get_num_threads()))
    print(flush=True)

    if args.time_cost_only:
        time_cost_only(args.encoder_frames, 60 if args.quick else 400)
        return
    m = measure(plan)
    if args.dump:
        np.savez(args.dump, encoder_ms=m.encoder.encoder_ms, encoder_again_ms=m.encoder_again_ms,
                 **{run.name.replace(' ', '_').replace('=', ''): run.step_ms
                    for run in [*m.runs, m.baseline]})
    report_encoder(m)
    report_latency(plan, m)
    report_memory(plan, m)
    report_side_by_side(plan, m)
    report_targets(plan, m)
    print(f'\nLoad average at the end: {load_average()}.')


if __name__ == '__main__':
    main()
