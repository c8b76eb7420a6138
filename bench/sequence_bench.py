#!/usr/bin/env python3
"""Sequence benchmark: does the memory keep WHEN things happened, not only WHAT?

Anticipation depends on order ("take knife, cut onion" is not "cut onion, put knife"). Built like
bench/memory_ablation.py (the presence task), from the same real photos, shots and encoder, and
trained with the same real training loop, but the label depends on order only:

  which-first  two cue shots (A = astronaut, B = chelsea) both appear, in random order, with
               distractor shots between them and at least 2 x M sampled frames after the
               second; the label is which cue came first (chance 50 %). Both are always
               present and both are far in the past, so neither presence nor recency helps.
  next-step    (--task next-step) three cue shots (A, B, C = coffee) are three steps of a
               cyclic routine A -> B -> C -> A ..., run forwards or backwards from any step
               (all six orders equally often), with distractors between them and at least
               2 x M frames after the third; the label is the step that comes next, A -> B ->
               C -> ? (chance 33 %). All three are always present and far back: only their
               order says what comes next (in a routine of three it is the one seen first).

Variants, side by side at each memory length M (same streams, seeds and budget):
  none       current frame only
  pool       one slot: the running mean of all frames (MBC with M = 1)
  fifo       M slots, the oldest dropped (both cues fall out)
  mbc-v1     MBC as before issue 12: the attention bias per age bucket only, zero at the start
             (model.order_bias false, time_features 0, value_decays 0, bias tables zeroed)
  mbc        MBC as the model's default: the age-bucket bias and the order bias, both starting
             as a spread of preferences, and the decays read beside the values
             (model/time_encoding.py)

    python bench/sequence_bench.py [--task which-first|next-step] [--memory 4 8 20]
                               [--seeds 3] [--epochs 12] [--lr 2e-3] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from benchlib import machine, table
from memory_ablation import (
    ARCH,
    CUE_PHOTOS,
    SHOT_FRAMES,
    TEST_SHOTS,
    TRAIN_SHOTS,
    PoolWindows,
    distractors,
    encode_pool,
    train_and_test,
)
from tqdm import tqdm

from malmm_ros.config import model_preset
from malmm_ros.labels import LabelMaps
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.model.time_encoding import RelativeTimeBias

# name: (cue photos, the label's meaning, chance, title of the plot)
TASKS = {
    'which-first': (CUE_PHOTOS[:2], 'which cue came first', 'Which cue came first'),
    'next-step': (CUE_PHOTOS[:3], 'the step after A -> B -> C', 'Next step of a routine'),
}
VARIANTS = {  # name: (training overrides, model overrides, start with zero time-bias tables)
    'none': ({'memory.current_frame_only': True}, {}, False),
    'pool': ({'memory.capacity': 1}, {}, False),
    'fifo': ({'memory.policy': 'fifo'}, {}, False),
    'mbc-v1': ({}, {'time_features': 0, 'order_bias': False, 'value_decays': 0}, True),
    'mbc': ({}, {}, False),
}


def stream_length(task: str, memory: int) -> int:
    """2 x M + 16 frames for two cues, 2 x M + 20 for three."""
    return 2 * memory + 8 + 4 * len(TASKS[task][0])


def order_streams(rows, count: int, shots: range, memory: int, rng: np.random.Generator,
                  task: str = 'which-first') -> tuple[list[list[int]], list[int]]:
    """`count` streams of `stream_length` frames: distractors, then the task's cues (2 frames
    each) with at least 2 distractor frames between consecutive cues, and at least 2 x M
    distractor frames after the last. which-first: label 0 when A came first, 1 when B did
    (alternating). next-step: the cues are a rotation of A, B, C, forwards or backwards (the
    six orders in turn); the label is the step after the last, the one seen first."""
    photos = TASKS[task][0]
    length = stream_length(task, memory)
    cue_frames = 2 * len(photos)
    streams, labels = [], []
    for i in range(count):
        if task == 'which-first':
            label = i % 2
            names = photos if label == 0 else photos[::-1]
        else:
            rotation, backwards = (i // 2) % 3, i % 2
            cycle = list(photos[::-1] if backwards else photos)
            names = cycle[rotation:] + cycle[:rotation]
            label = photos.index(names[0])  # A -> B -> C -> A: after X, Y, Z comes X
        cues = []
        for name in names:
            frames = rows[(name, int(rng.choice(shots)))]
            start = int(rng.integers(0, SHOT_FRAMES - 1))
            cues.append(frames[start:start + 2])
        gaps = len(names) - 1
        after = int(rng.integers(2 * memory, length - cue_frames - 2 * gaps + 1))
        if task == 'which-first':  # as first measured: the gap, then the rest before
            between = [int(rng.integers(2, length - cue_frames - after + 1))]
            before = length - cue_frames - after - between[0]
        else:  # at least 2 frames in each gap, the rest spread at random before and between
            spare = length - cue_frames - after - 2 * gaps
            cuts = np.sort(rng.integers(0, spare + 1, size=gaps))
            split = np.diff(np.concatenate([[0], cuts, [spare]]))  # gaps + 1 parts
            before, between = int(split[0]), [2 + int(x) for x in split[1:]]
        stream = distractors(rows, before, shots, rng) + cues[0]
        for gap, cue in zip(between, cues[1:], strict=True):
            stream += distractors(rows, gap, shots, rng) + cue
        streams.append(stream + distractors(rows, after, shots, rng))
        labels.append(label)
    return streams, labels


def run_variant(name: str, memory: int, seed: int, train_set: PoolWindows,
                test_set: PoolWindows, args: argparse.Namespace) -> float:
    """Train one variant with the real loop; its test accuracy."""
    train_overrides, model_overrides, zero_bias = VARIANTS[name]
    torch.manual_seed(seed)
    model = MalmmModel(model_preset('edge', **{**ARCH, **model_overrides}),
                       LabelMaps.placeholder(len(TASKS[args.task][0]), 1))
    if zero_bias:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, RelativeTimeBias):
                    module.table.zero_()
    return train_and_test(model, {'out_dir': str(args.out / f'{name}-m{memory}-seed{seed}'),
                                  'seed': seed, 'optim.epochs': args.epochs,
                                  'optim.lr': args.lr, **train_overrides},
                          memory, train_set, test_set)


_POOL: tuple = ()


def _start_worker(pool: np.ndarray, rows: dict, threads: int) -> None:
    global _POOL
    torch.set_num_threads(threads)
    _POOL = (pool, rows)


def run_job(job: tuple[int, int, str], args: argparse.Namespace) -> tuple[int, int, str, float]:
    """One (M, seed, variant): its streams (the same for every variant) and test accuracy."""
    memory, seed, variant = job
    pool, rows = _POOL
    rng = np.random.default_rng(1000 * memory + seed)
    train_set = PoolWindows(pool, *order_streams(rows, args.train_streams, TRAIN_SHOTS, memory,
                                                 rng, args.task))
    test_set = PoolWindows(pool, *order_streams(rows, args.test_streams, TEST_SHOTS, memory,
                                                rng, args.task))
    return memory, seed, variant, run_variant(variant, memory, seed, train_set, test_set, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--task', default='which-first', choices=list(TASKS))
    parser.add_argument('--memory', type=int, nargs='+', default=[8, 4, 20],
                        help='memory lengths M (20: the node default)')
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--epochs', type=int, default=12)
    parser.add_argument('--lr', type=float, default=2e-3,
                        help='peak learning rate (default 2e-3, as bench/memory_ablation.py)')
    parser.add_argument('--train-streams', type=int, default=256)
    parser.add_argument('--test-streams', type=int, default=128)
    parser.add_argument('--jobs', type=int, default=2,
                        help='runs trained at once, in separate processes')
    parser.add_argument('--threads', type=int, default=1, help='torch threads per job')
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument('--out', type=Path, default=None,
                        help='default bench/results/sequence (which-first) or '
                             'bench/results/sequence-next-step')
    parser.add_argument('--resume', action='store_true',
                        help='keep the runs already in OUT/sequence.json (same settings) and '
                             'train only the missing ones')
    parser.add_argument('--report', action='store_true',
                        help="print the table and plot of OUT/sequence.json (a run's results "
                             'so far) and exit')
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path('bench/results/sequence' + ('' if args.task == 'which-first'
                                                     else f'-{args.task}'))
    if args.report:
        report(args.out / 'sequence.json')
        return 0
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    pool, rows = encode_pool('onnxruntime', seed=1234)
    results: dict[int, dict[str, list[float]]] = {  # per seed, in seed order
        m: {v: [math.nan] * args.seeds for v in args.variants} for m in args.memory}
    earlier_minutes = resume(args, results, parser) if args.resume else 0.0
    # In the order given (M, then seed), so a stopped run has whole rows; results.json is
    # rewritten after every run.
    jobs = [(m, seed, v) for m in args.memory for seed in range(args.seeds)
            for v in args.variants if math.isnan(results[m][v][seed])]
    context = multiprocessing.get_context('spawn')  # no torch/onnxruntime threads forked
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_start_worker,
                             initargs=(pool, rows, args.threads)) as executor:
        futures = [executor.submit(run_job, job, args) for job in jobs]
        bar = tqdm(as_completed(futures), total=len(futures), desc='train+test', unit='run')
        for future in bar:
            memory, seed, variant, accuracy = future.result()
            results[memory][variant][seed] = accuracy
            save(args, results, earlier_minutes + (time.perf_counter() - began) / 60)
            bar.set_postfix(m=memory, variant=variant, seed=seed, acc=f'{accuracy:.3f}')
    save(args, results, earlier_minutes + (time.perf_counter() - began) / 60)
    print(machine(torch_threads=args.threads))
    print(f'{args.jobs} jobs at once, {args.threads} torch thread(s) each')
    report(args.out / 'sequence.json')
    return 0


def resume(args: argparse.Namespace, results: dict[int, dict[str, list[float]]],
           parser: argparse.ArgumentParser) -> float:
    """Fill `results` from OUT/sequence.json (runs of other M or variants kept too); the
    minutes it had taken."""
    path = args.out / 'sequence.json'
    if not path.exists():
        return 0.0
    earlier = json.loads(path.read_text())
    settings = ('task', 'epochs', 'lr', 'train_streams', 'test_streams')
    if any(earlier.get(k, 'which-first') != getattr(args, k) for k in settings):
        parser.error(f'--resume: {path} was run with other settings '
                     f'({", ".join(f"{k} {earlier[k]}" for k in settings)})')
    for m, by_variant in earlier['results'].items():
        for variant, accs in by_variant.items():
            row = results.setdefault(int(m), {}).setdefault(variant, [])
            row.extend([math.nan] * (max(len(accs), args.seeds) - len(row)))
            for seed, accuracy in enumerate(accs):
                if accuracy is not None:
                    row[seed] = accuracy
    return float(earlier['minutes'])


def report(path: Path) -> None:
    """Print the table and draw the plot of a sequence.json (runs not done yet left out)."""
    summary = json.loads(path.read_text())
    task = summary.get('task', 'which-first')
    photos, meaning, title = TASKS[task]
    results = {int(m): {v: [a for a in accs if a is not None] for v, accs in by_variant.items()}
               for m, by_variant in summary['results'].items()}
    print(f"\n{task} ({meaning}): streams of 2 x M + {stream_length(task, 0)} frames, the last "
          f"cue >= 2 x M frames before the end; {summary['train_streams']} train / "
          f"{summary['test_streams']} test streams; {summary['epochs']} epochs, lr "
          f"{summary['lr']:g}; chance {100 / len(photos):.0f} %; {summary['minutes']:.1f} min\n")
    rows = [[str(m), v, f'{100 * np.mean(a):.1f} %', f'{100 * np.std(a):.1f}',
             ', '.join(f'{100 * x:.1f}' for x in a)]
            for m, by_variant in results.items() for v, a in by_variant.items() if a]
    print(table(['M', 'variant', 'accuracy mean', 'std', 'per seed'], rows))
    plot({m: r for m, r in results.items() if all(r.values())}, path.with_suffix('.png'),
         title, 100 / len(photos))


def save(args: argparse.Namespace, results: dict[int, dict[str, list[float]]],
         minutes: float) -> None:
    """sequence.json: accuracy per M, variant and seed (null: not run yet)."""
    summary = {'task': args.task, 'minutes': minutes, 'epochs': args.epochs, 'lr': args.lr,
               'train_streams': args.train_streams, 'test_streams': args.test_streams,
               'results': {str(m): {v: [None if math.isnan(a) else a for a in accs]
                                    for v, accs in by_variant.items()}
                           for m, by_variant in results.items()}}
    (args.out / 'sequence.json').write_text(json.dumps(summary, indent=2) + '\n')


def plot(results: dict[int, dict[str, list[float]]], path: Path, title: str,
         chance: float) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    memories = list(results)
    variants = list(next(iter(results.values())))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for j, variant in enumerate(variants):
        xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(memories))]
        means = [100 * np.mean(results[m][variant]) for m in memories]
        errs = [100 * np.std(results[m][variant]) for m in memories]
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=variant)
    ax.axhline(chance, color='grey', ls='--', lw=1)
    ax.set_xticks(range(len(memories)), [f'M = {m}' for m in memories])
    ax.set_ylabel('test accuracy (%)')
    ax.set_ylim(0, 100)
    ax.set_title(f'{title} (chance {chance:.0f} %)')
    ax.legend(fontsize=7, ncol=len(variants))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == '__main__':
    sys.exit(main())
