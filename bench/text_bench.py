"""Text description benchmark: how long one description takes on this CPU.

What it measures, for each LLM, through TextDescriber (the node's code path), fp32 on CPU:

- load: TextDescriber.load of the saved folder (transformers already imported);
- describe: `generate` on one stream's query outputs [1, 32, 128] (the edge Q-Former's: 32
  queries of its hidden size 128), the projection, prompt and decoding included; median, p10
  and p90 over --runs calls after one warm-up call, for greedy and beam (3 beams) decoding at
  --max-new-tokens;
- per token: the greedy median over the tokens it produced;
- caption step: one caption_loss forward and backward (batch 8, 8-token narrations), what
  training the projector costs per batch;
- RSS added by the loaded describer (VmRSS, after gc.collect()).

LLMs: the tiny random Llama the tests use; random-weight models with the exact shape
(layers, widths, heads, vocabulary) of SmolLM2-135M and Qwen2.5-0.5B, built here because their
weights cannot be downloaded on this machine: the cost of a forward pass depends on the shape,
not on the weights; and every real causal LM found locally (folders given with --model, and the
Hugging Face cache under $HF_HOME or ~/.cache/huggingface). Random models never end early (they
never pick end-of-text), so their descriptions are exactly --max-new-tokens long; a real model
may stop sooner (its token count is printed). Nothing is asserted. Run from the repository root:

    .venv/bin/python bench/text_bench.py                 # about 3-5 minutes on 2 cores
    .venv/bin/python bench/text_bench.py --quick         # tiny model only
    .venv/bin/python bench/text_bench.py --model /path/to/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from benchlib import machine, rss_mb, table
from tqdm import tqdm

from malmm_ros.config import model_preset
from malmm_ros.model.text import GenerationOptions, TextDescriber, offline_transformers
from malmm_ros.model.tiny_llm import KITCHEN_SENTENCES, write_tiny_llm

QFORMER_WIDTH = model_preset('edge').hidden_size  # 128
NUM_QUERIES = model_preset('edge').num_queries  # 32
BEAMS = 3
CAPTION_BATCH = 8

# name -> write_tiny_llm arguments; the shapes come from the models' published config.json.
RANDOM_MODELS = {
    'tiny Llama (tests)': dict(hidden_size=64, num_layers=2, num_heads=4),
    'SmolLM2-135M shape, random weights': dict(
        family='llama', hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
        intermediate_size=1536, model_vocab_size=49152, tie_embeddings=True),
    'Qwen2.5-0.5B shape, random weights': dict(
        family='qwen2', hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
        intermediate_size=4864, model_vocab_size=151936, tie_embeddings=True),
}


@dataclass
class Row:
    name: str
    params_m: float
    load_s: float
    greedy_ms: list[float]
    greedy_tokens: int
    beam_ms: list[float]
    caption_ms: float
    rss_mb: float


def local_models(extra: list[str]) -> list[Path]:
    """Folders of causal LMs: those given, then every snapshot in the Hugging Face cache."""
    found = [Path(p).expanduser() for p in extra]
    home = Path(os.environ.get('HF_HOME', Path.home() / '.cache' / 'huggingface'))
    for config in sorted((home / 'hub').glob('models--*/snapshots/*/config.json')):
        try:
            architectures = json.loads(config.read_text()).get('architectures') or []
        except (OSError, json.JSONDecodeError):
            continue
        if any(name.endswith('ForCausalLM') for name in architectures):
            found.append(config.parent)
    return found


def measure(name: str, folder: Path, runs: int, max_new_tokens: int) -> Row:
    before = rss_mb()
    start = time.perf_counter()
    describer = TextDescriber.load(folder, QFORMER_WIDTH,
                                   options=GenerationOptions(max_new_tokens=max_new_tokens))
    load_s = time.perf_counter() - start
    queries = torch.randn(1, NUM_QUERIES, QFORMER_WIDTH, generator=torch.Generator()
                          .manual_seed(0))
    results = {}
    for decoding in ('greedy', 'beam'):
        describer.options = GenerationOptions(max_new_tokens=max_new_tokens, decoding=decoding,
                                              num_beams=BEAMS)
        describer.generate(queries)  # warm-up
        timings, tokens = [], 0
        for _ in tqdm(range(runs), desc=f'{name} {decoding}', leave=False):
            description = describer.generate(queries)
            timings.append(description.latency_ms)
            tokens = description.num_tokens
        results[decoding] = (timings, tokens)
    describer.options = GenerationOptions(max_new_tokens=8)
    batch = torch.randn(CAPTION_BATCH, NUM_QUERIES, QFORMER_WIDTH, requires_grad=True)
    texts = [KITCHEN_SENTENCES[i % len(KITCHEN_SENTENCES)] for i in range(CAPTION_BATCH)]
    describer.caption_loss(batch, texts).backward()  # warm-up
    start = time.perf_counter()
    for _ in range(3):
        describer.caption_loss(batch, texts).backward()
    caption_ms = (time.perf_counter() - start) / 3 * 1e3
    params_m = sum(p.numel() for p in describer.llm.parameters()) / 1e6
    rss = rss_mb() - before
    row = Row(name, params_m, load_s, results['greedy'][0], results['greedy'][1],
              results['beam'][0], caption_ms, rss)
    del describer
    gc.collect()
    return row


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--runs', type=int, default=5, help='timed descriptions per decoding')
    parser.add_argument('--max-new-tokens', type=int, default=24)
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads (the node leaves the LLM one core on 2 cores)')
    parser.add_argument('--model', action='append', default=[],
                        help='a local causal LM folder to include (repeatable)')
    parser.add_argument('--quick', action='store_true', help='the tiny model only, 3 runs')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Every projector here is untrained on purpose: no need to be told at each load.
    logging.getLogger('malmm_ros.model.text').setLevel(logging.ERROR)
    runs = 3 if args.quick else args.runs
    offline_transformers()  # import once, outside the load timings

    print('# malmm_ros text description benchmark\n')
    print(f'Run {time.strftime("%Y-%m-%d %H:%M")}; load average at start: '
          f'{os.getloadavg()[0]:.2f}.\n')
    print(machine(torch_threads=args.threads))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        names = list(RANDOM_MODELS)[:1] if args.quick else list(RANDOM_MODELS)
        for name in names:
            folder = write_tiny_llm(Path(tmp) / f'model{len(rows)}', endless=True,
                                    **RANDOM_MODELS[name])
            rows.append(measure(name, folder, runs, args.max_new_tokens))
            for path in Path(folder).iterdir():  # free the disk before the next one
                path.unlink()
    real = local_models(args.model)
    for folder in real:
        rows.append(measure(f'{folder.name} (real)', folder, runs, args.max_new_tokens))

    print(f'\n## One description, CPU fp32, [1, {NUM_QUERIES}, {QFORMER_WIDTH}] queries, '
          f'max_new_tokens {args.max_new_tokens}\n')
    print(table(
        ['LLM', 'params M', 'load s', 'tokens', 'greedy ms p50', '(p10-p90)', 'ms/token',
         f'beam x{BEAMS} ms p50', f'caption step ms (batch {CAPTION_BATCH})', 'RSS + MB'],
        [[r.name, f'{r.params_m:.1f}', f'{r.load_s:.2f}', str(r.greedy_tokens),
          f'{statistics.median(r.greedy_ms):.0f}',
          f'{pct(r.greedy_ms, 0.1):.0f}-{pct(r.greedy_ms, 0.9):.0f}',
          f'{statistics.median(r.greedy_ms) / max(r.greedy_tokens, 1):.1f}',
          f'{statistics.median(r.beam_ms):.0f}', f'{r.caption_ms:.0f}', f'{r.rss_mb:.0f}']
         for r in rows]))
    if not real:
        home = os.environ.get('HF_HOME', '~/.cache/huggingface')
        print(f'\nNo real small causal LM is present on this machine (none given with --model, '
              f'none in {home}/hub): only random-weight stand-ins were timed.')


if __name__ == '__main__':
    main()
