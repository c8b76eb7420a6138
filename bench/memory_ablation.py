#!/usr/bin/env python3
"""Long-memory ablation: does the memory keep a cue seen long before the prediction?

EK-100 videos are not available here, so this builds a controlled task from real photos
(scikit-image data) encoded by the real EfficientNet-Lite0 encoder. A stream is a sequence of
"shots": a few frames of one photo with a slow, slightly noisy camera pan (frames of a shot are
alike, as in video). One short shot shows one of four cue photos; at least 4 x M sampled
frames of distractor shots follow it. The label to anticipate is the cue's class, so only a
memory that keeps the cue can beat chance (25 %).

Every variant is trained with the real training loop (malmm_ros.training.anticipation.train)
with the same budget, then scored on streams built from unseen shots:
  none      current frame only (no memory)
  fifo      M slots, the oldest dropped
  pool      one slot holding the running mean of all frames (average pooling; MBC with M = 1)
  mbc-vis   MBC, visual bank only (no query bank)
  mbc       MBC with visual and query banks (MA-LMM)

    python bench/memory_ablation.py [--seeds 3] [--epochs 10] [--out bench/results/ablation]

With --int8-check (issue 13) the variants (default: mbc) are trained on fp32 features as above
and each trained model is scored twice, on the test streams encoded by the fp32 encoder and by
the INT8 ONNX Runtime encoder: the same frames, so the difference is the INT8 encoder's alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from benchlib import table
from skimage import data as skdata
from tqdm import tqdm

from malmm_ros.config import model_preset
from malmm_ros.imaging import resize_and_crop
from malmm_ros.labels import LabelMaps
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.model.memory import MemorySpec
from malmm_ros.runtime import create_encoder
from malmm_ros.training.anticipation import train
from malmm_ros.training.config import TrainConfig
from malmm_ros.training.streaming import WindowModel, predict_windows
from malmm_ros.training.windows import WindowSource

CUE_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket')
DISTRACTOR_PHOTOS = ('camera', 'coins', 'horse', 'hubble_deep_field', 'immunohistochemistry',
                     'moon', 'page', 'retina', 'brick', 'grass', 'gravel', 'text')
SHOT_FRAMES = 5  # frames per pooled shot; a stream uses 2..5 of them
SHOTS_PER_PHOTO = 6  # shots 0-3 build training streams, 4-5 test streams
TRAIN_SHOTS, TEST_SHOTS = range(0, 4), range(4, 6)
VARIANTS = {
    'none': {'memory.current_frame_only': True},
    'fifo': {'memory.policy': 'fifo'},
    'pool': {'memory.capacity': 1},
    'mbc-vis': {'memory.query_memory': False},
    'mbc': {},
}
ARCH = dict(num_layers=2, hidden_size=64, num_heads=2, intermediate_size=128, num_queries=8,
            encoder_width=64, cross_attention_every=1)


def photo(name: str) -> np.ndarray:
    image = getattr(skdata, name)()
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).astype(np.uint8) if image.max() <= 1 else \
            image.astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def shot(image: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """SHOT_FRAMES frames of a slow pan over a random crop, with light jitter and noise."""
    h, w = image.shape[:2]
    scale = rng.uniform(0.55, 0.85)
    ch, cw = int(h * scale), int(w * scale)
    y0, x0 = rng.uniform(0, h - ch), rng.uniform(0, w - cw)
    dy, dx = rng.uniform(-0.02, 0.02) * h, rng.uniform(-0.02, 0.02) * w  # per frame
    flip = rng.random() < 0.5
    gain, bias = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
    frames = []
    for i in range(SHOT_FRAMES):
        y = int(np.clip(y0 + i * dy, 0, h - ch))
        x = int(np.clip(x0 + i * dx, 0, w - cw))
        crop = image[y:y + ch, x:x + cw].astype(np.float32)
        crop = crop * gain + bias + rng.normal(0, 4.0, crop.shape)
        crop = np.clip(crop, 0, 255).astype(np.uint8)
        if flip:
            crop = crop[:, ::-1]
        frames.append(resize_and_crop(np.ascontiguousarray(crop)))
    return frames


def encode_pool(backend: str, seed: int, precision: str = 'fp32'
                ) -> tuple[np.ndarray, dict[tuple[str, int], list[int]]]:
    """Encode every shot frame once: tokens [F, 49, 1280] and (photo, shot) -> frame rows.
    The frames depend on `seed` only, so pools of one seed hold the same frames whatever the
    encoder."""
    rng = np.random.default_rng(seed)
    encoder = create_encoder(backend, threads=torch.get_num_threads(), precision=precision)
    rows: dict[tuple[str, int], list[int]] = {}
    frames = []
    for name in CUE_PHOTOS + DISTRACTOR_PHOTOS:
        image = photo(name)
        for s in range(SHOTS_PER_PHOTO):
            rows[(name, s)] = list(range(len(frames), len(frames) + SHOT_FRAMES))
            frames.extend(shot(image, rng))
    tokens = []
    for start in tqdm(range(0, len(frames), 8), desc=f'encode ({encoder.name})', unit='batch'):
        tokens.append(encoder.run(np.stack(frames[start:start + 8])))
    return np.concatenate(tokens).astype(np.float16), rows


@dataclass
class StreamSpec:
    length: int
    gap: int  # frames after the cue's last frame


class PoolWindows(WindowSource):
    """Streams as rows into the encoded pool (tokens are gathered per batch)."""

    def __init__(self, pool: np.ndarray, streams: list[list[int]], labels: list[int]) -> None:
        self.pool = pool
        self.streams = streams
        self.verbs = np.asarray(labels, dtype=np.int64)
        self.nouns = np.zeros(len(labels), dtype=np.int64)
        self.actions = np.full(len(labels), -100, dtype=np.int64)
        self.patterns = [tuple(float(t - len(s) + 1) for t in range(len(s))) for s in streams]

    def load_tokens(self, index):
        return self.pool[np.array([self.streams[i] for i in index])].astype(np.float32)


def make_streams(rows, count: int, shots: range, spec: StreamSpec, rng: np.random.Generator
                 ) -> tuple[list[list[int]], list[int]]:
    streams, labels = [], []
    for i in range(count):
        label = i % len(CUE_PHOTOS)
        cue_rows = rows[(CUE_PHOTOS[label], int(rng.choice(shots)))]
        start = int(rng.integers(0, SHOT_FRAMES - 1))
        cue = cue_rows[start:start + 2]
        before = int(rng.integers(0, spec.length - spec.gap - len(cue) + 1))
        after = spec.length - before - len(cue)
        streams.append(distractors(rows, before, shots, rng) + cue +
                       distractors(rows, after, shots, rng))
        labels.append(label)
    return streams, labels


def distractors(rows, count: int, shots: range, rng: np.random.Generator) -> list[int]:
    out: list[int] = []
    while len(out) < count:
        name = DISTRACTOR_PHOTOS[int(rng.integers(len(DISTRACTOR_PHOTOS)))]
        frames = rows[(name, int(rng.choice(shots)))]
        take = int(rng.integers(2, SHOT_FRAMES + 1))
        start = int(rng.integers(0, SHOT_FRAMES - take + 1))
        out.extend(frames[start:start + take])
    return out[:count]


def train_windows(model: MalmmModel, overrides: dict, memory: int, train_set: PoolWindows
                  ) -> WindowModel:
    """Train `model` with the real loop (verb loss only, batch 16, 10 warm-up steps; the
    TrainConfig `overrides` add out_dir, seed, epochs, lr and the variant's memory settings) at
    memory length `memory`; the trained model with its memory, ready to score streams."""
    config = TrainConfig.from_dict({
        'device': 'cpu', 'optim.batch_size': 16, 'optim.warmup_steps': 10,
        'optim.label_smoothing': 0.0, 'optim.noun_weight': 0.0, 'optim.action_weight': 0.0,
        **overrides})
    capacity = config.memory.capacity or memory
    train(config, model, train_set, capacity=capacity, progress=False, save=False)
    spec = MemorySpec(capacity, policy=config.memory.policy,
                      query_memory=config.memory.query_memory)
    return WindowModel(model, spec, current_frame_only=config.memory.current_frame_only)


def accuracy(runner: WindowModel, test_set: PoolWindows) -> float:
    """Verb accuracy of the trained `runner` on `test_set`."""
    scores = predict_windows(runner, test_set, batch_size=32)['verb']
    return float((scores.argmax(1) == test_set.verbs).mean())


def train_and_test(model: MalmmModel, overrides: dict, memory: int, train_set: PoolWindows,
                   test_set: PoolWindows) -> float:
    """`train_windows`, then the accuracy on `test_set`. Shared with bench/sequence_bench.py."""
    return accuracy(train_windows(model, overrides, memory, train_set), test_set)


def run_variant(name: str, seed: int, train_set: PoolWindows, test_sets: list[PoolWindows],
                args: argparse.Namespace, out_dir: Path) -> list[float]:
    """Train variant `name` once; its accuracy on each of `test_sets`."""
    torch.manual_seed(seed)
    model = MalmmModel(model_preset('edge', **ARCH), LabelMaps.placeholder(len(CUE_PHOTOS), 1))
    runner = train_windows(model, {'out_dir': str(out_dir / f'{name}-seed{seed}'),
                                   'seed': seed, 'optim.epochs': args.epochs, 'optim.lr': 2e-3,
                                   **VARIANTS[name]}, args.memory, train_set)
    return [accuracy(runner, test_set) for test_set in test_sets]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--epochs', type=int, default=10)
    parser.add_argument('--memory', type=int, default=4, help='memory length M')
    parser.add_argument('--train-streams', type=int, default=256)
    parser.add_argument('--test-streams', type=int, default=128)
    parser.add_argument('--backend', default='onnxruntime', choices=('onnxruntime', 'torch'))
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--variants', nargs='+', choices=list(VARIANTS),
                        help='default: all; mbc with --int8-check')
    parser.add_argument('--int8-check', action='store_true',
                        help='score each trained model on fp32 and on INT8-encoder test '
                             'features (ONNX Runtime)')
    parser.add_argument('--out', type=Path, default=Path('bench/results/ablation'))
    args = parser.parse_args(argv)
    variants = args.variants or (['mbc'] if args.int8_check else list(VARIANTS))
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    spec = StreamSpec(length=6 * args.memory, gap=4 * args.memory)
    began = time.perf_counter()
    pool, rows = encode_pool(args.backend, seed=1234)
    # The INT8 pool holds the same frames (same seed), encoded by the INT8 graph.
    int8_pool = encode_pool('onnxruntime', seed=1234, precision='int8')[0] \
        if args.int8_check else None
    results: dict[str, list[float]] = {v: [] for v in variants}
    int8_results: dict[str, list[float]] = {v: [] for v in variants}
    jobs = [(seed, v) for seed in range(args.seeds) for v in variants]
    bar = tqdm(jobs, desc='train+test', unit='run')
    for seed, variant in bar:
        rng = np.random.default_rng(seed)
        train_set = PoolWindows(pool, *make_streams(rows, args.train_streams, TRAIN_SHOTS,
                                                    spec, rng))
        streams, labels = make_streams(rows, args.test_streams, TEST_SHOTS, spec, rng)
        test_sets = [PoolWindows(pool, streams, labels)]
        if int8_pool is not None:
            test_sets.append(PoolWindows(int8_pool, streams, labels))
        scores = run_variant(variant, seed, train_set, test_sets, args, args.out)
        results[variant].append(scores[0])
        if int8_pool is not None:
            int8_results[variant].append(scores[1])
        bar.set_postfix(variant=variant, seed=seed, acc=f'{scores[0]:.3f}')
    minutes = (time.perf_counter() - began) / 60
    print(f'\nstreams of {spec.length} frames, cue >= {spec.gap} frames (4 x M, M = '
          f'{args.memory}) before the end; {args.train_streams} train / {args.test_streams} '
          f'test streams; {args.epochs} epochs; chance 25 %; {minutes:.1f} min')
    summary = {'results': results, 'minutes': minutes, 'memory': args.memory,
               'stream_length': spec.length, 'gap': spec.gap, 'epochs': args.epochs}
    if int8_pool is not None:
        print(int8_table(results, int8_results))
        summary['int8_results'] = int8_results
        # Its own file: a check of a few variants must not replace the full ablation's results.
        (args.out / 'int8_check.json').write_text(json.dumps(summary, indent=2) + '\n')
        return 0
    print(table(['variant', 'accuracy mean', 'std', 'per seed'],
                [[variant, f'{100 * np.mean(accs):.1f} %', f'{100 * np.std(accs):.1f}',
                  ', '.join(f'{100 * a:.1f}' for a in accs)]
                 for variant, accs in results.items()]))
    (args.out / 'ablation.json').write_text(json.dumps(summary, indent=2) + '\n')
    plot(results, args.out / 'ablation.png')
    return 0


def int8_table(fp32: dict[str, list[float]], int8: dict[str, list[float]]) -> str:
    """Test accuracy of each trained model with fp32 and with INT8-encoder features."""
    rows = []
    for variant, accs in fp32.items():
        a, b = 100 * np.asarray(accs), 100 * np.asarray(int8[variant])
        rows.append([variant, f'{a.mean():.1f} %', f'{b.mean():.1f} %',
                     f'{(b - a).mean():+.1f}', f'{np.abs(b - a).max():.1f}',
                     ', '.join(f'{x:.1f} / {y:.1f}' for x, y in zip(a, b, strict=True))])
    return table(['variant', 'fp32 features', 'INT8 features', 'INT8 - fp32 (points)',
                  'largest |difference| of a seed', 'per seed (fp32 / INT8)'], rows)


def plot(results: dict[str, list[float]], path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = list(results)
    means = [100 * np.mean(results[n]) for n in names]
    errs = [100 * np.std(results[n]) for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, means, yerr=errs, capsize=4, color='#4c72b0')
    for i, n in enumerate(names):
        ax.scatter([i] * len(results[n]), [100 * a for a in results[n]], color='k', s=10)
    ax.axhline(25, color='grey', ls='--', lw=1, label='chance')
    ax.set_ylabel('test accuracy (%)')
    ax.set_ylim(0, 100)
    ax.set_title('Cue recalled after >= 4 x M frames')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == '__main__':
    sys.exit(main())
