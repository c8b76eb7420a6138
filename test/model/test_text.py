"""Text descriptions (malmm_ros.model.text) with tiny causal LMs built and saved here.

Each LLM is a Llama or Qwen2 configuration with random weights and a BPE tokenizer trained on
a few sentences with the `tokenizers` library, written with save_pretrained into a temporary
folder and loaded through TextDescriber.load, the path users take with a real model.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from malmm_ros.config import AnticipateConfig
from malmm_ros.errors import CheckpointError, ConfigError
from malmm_ros.model.text import (
    DESCRIPTION_SCHEMA,
    IGNORE_INDEX,
    Description,
    GenerationOptions,
    Grounding,
    TextDescriber,
    TextProjector,
    llm_name,
)
from malmm_ros.model.tiny_llm import write_tiny_llm

REPO = Path(__file__).resolve().parents[2]
WIDTH = 32  # Q-Former width of these tests
NUM_QUERIES = 8


@pytest.fixture(scope='module')
def llm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('llms')
    return {
        'llama': write_tiny_llm(root / 'tiny-llama', family='llama', hidden_size=48),
        'qwen2': write_tiny_llm(root / 'tiny-qwen2', family='qwen2', hidden_size=64),
    }


@pytest.fixture(scope='module')
def describer(llm_dirs: dict[str, Path], single_thread: None) -> TextDescriber:
    return TextDescriber.load(llm_dirs['llama'], WIDTH)


def _queries(seed: int, batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, NUM_QUERIES, WIDTH, generator=generator)


def _longest_token_text(describer: TextDescriber) -> int:
    """Characters of the longest single token once decoded."""
    tokenizer = describer.tokenizer
    return max(len(tokenizer.decode([i])) for i in range(len(tokenizer)))


# -- loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize('family', ['llama', 'qwen2'])
def test_loads_a_saved_folder_frozen(llm_dirs: dict[str, Path], family: str,
                                     single_thread: None) -> None:
    describer = TextDescriber.load(llm_dirs[family], WIDTH)
    assert describer.name == llm_dirs[family].name
    assert not describer.llm.training
    assert all(not p.requires_grad for p in describer.llm.parameters())
    assert describer.dtype == torch.float32  # fp16 is for CUDA only
    assert describer.projector.qformer_hidden_size == WIDTH
    assert describer.projector.llm_hidden_size == describer.llm.config.hidden_size
    assert describer.trained is False
    assert describer.describe(_queries(0))  # some text comes out


def test_load_forces_offline_mode(describer: TextDescriber) -> None:
    assert os.environ['HF_HUB_OFFLINE'] == '1'
    assert os.environ['TRANSFORMERS_OFFLINE'] == '1'


@pytest.mark.slow  # a fresh process that loads the pipeline
def test_text_off_never_imports_transformers() -> None:
    """The core, the pipeline and the text module itself import without transformers."""
    code = ('import sys, malmm_ros.model.text, malmm_ros.model.checkpoint, '
            'malmm_ros.pipeline, malmm_ros.model.tiny_llm\n'
            'print(sorted(m for m in sys.modules if m.split(".")[0] in '
            '("transformers", "tokenizers")))')
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[]'


def test_untrained_projector_is_seeded_and_warned(llm_dirs: dict[str, Path],
                                                  caplog: pytest.LogCaptureFixture,
                                                  single_thread: None) -> None:
    with caplog.at_level(logging.WARNING, logger='malmm_ros.model.text'):
        first = TextDescriber.load(llm_dirs['llama'], WIDTH)
    assert 'no trained text projector' in caplog.text
    rng_state = torch.random.get_rng_state()
    second = TextDescriber.load(llm_dirs['llama'], WIDTH)
    assert torch.equal(rng_state, torch.random.get_rng_state())  # the global RNG is untouched
    for a, b in zip(first.projector.parameters(), second.projector.parameters(), strict=True):
        assert torch.equal(a, b)
    assert first.describe(_queries(3)) == second.describe(_queries(3))


def test_empty_model_path_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match='text.model_path is empty'):
        TextDescriber.load('', WIDTH)


def test_missing_model_path(tmp_path: Path) -> None:
    path = tmp_path / 'no-such-model'
    with pytest.raises(CheckpointError, match=f'{path}.* does not exist.*never downloaded'):
        TextDescriber.load(path, WIDTH)


def test_hub_name_is_not_looked_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub model id is never resolved remotely or from a cache: only a folder is a model."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match='does not exist'):
        TextDescriber.load('HuggingFaceTB/SmolLM2-135M', WIDTH)


def test_file_instead_of_folder(tmp_path: Path) -> None:
    path = tmp_path / 'model.safetensors'
    path.write_bytes(b'not a folder')
    with pytest.raises(CheckpointError, match='is neither a .gguf file nor a folder'):
        TextDescriber.load(path, WIDTH)


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / 'README.md').write_text('not a model')
    with pytest.raises(CheckpointError, match='has no config.json'):
        TextDescriber.load(tmp_path, WIDTH)


@pytest.mark.parametrize('case', ['garbage_config', 'not_causal', 'no_weights', 'no_tokenizer'])
def test_folder_that_is_not_a_causal_lm(tmp_path: Path, llm_dirs: dict[str, Path],
                                        case: str) -> None:
    folder = tmp_path / case
    folder.mkdir()
    source = llm_dirs['llama']
    for name in ('config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'):
        (folder / name).write_bytes((source / name).read_bytes())
    if case == 'garbage_config':
        (folder / 'config.json').write_text('{"model_type": ')
    elif case == 'not_causal':  # a vision encoder config: no causal-LM class exists for it
        (folder / 'config.json').write_text(json.dumps({'model_type': 'vit'}))
    elif case == 'no_weights':
        (folder / 'model.safetensors').unlink()
    else:
        (folder / 'tokenizer.json').unlink()
        (folder / 'tokenizer_config.json').unlink()
    with pytest.raises(CheckpointError, match=f'{folder}: cannot load a causal language model'):
        TextDescriber.load(folder, WIDTH)


def test_llm_name_of_a_hub_cache_snapshot(tmp_path: Path) -> None:
    snapshot = tmp_path / 'models--HuggingFaceTB--SmolLM2-135M' / 'snapshots' / 'abc123'
    snapshot.mkdir(parents=True)
    assert llm_name(snapshot) == 'HuggingFaceTB/SmolLM2-135M'
    assert llm_name(tmp_path / 'my-model') == 'my-model'


# -- generation -------------------------------------------------------------------------------


@pytest.mark.parametrize('decoding', ['greedy', 'beam'])
@pytest.mark.parametrize('max_new_tokens', [1, 5, 40])
def test_generation_has_bounded_length(describer: TextDescriber, decoding: str,
                                       max_new_tokens: int) -> None:
    describer.options = GenerationOptions(max_new_tokens=max_new_tokens, decoding=decoding)
    try:
        description = describer.generate(_queries(1), stamp_ns=123, frame_id='cam')
    finally:
        describer.options = GenerationOptions()
    assert isinstance(description, Description)
    assert 0 <= description.num_tokens <= max_new_tokens
    assert len(description.text) <= description.num_tokens * _longest_token_text(describer)
    assert '\n' not in description.text and description.text == description.text.strip()
    assert all(ch.isprintable() for ch in description.text)
    assert description.latency_ms > 0
    assert (description.stamp_ns, description.frame_id) == (123, 'cam')
    assert description.model == describer.name and description.trained is False


def _reference_greedy(describer: TextDescriber, queries: torch.Tensor, prompt: str,
                      steps: int) -> list[int]:
    """Greedy decoding written out: full forward passes, no cache, argmax of the last logit."""
    llm, tokenizer = describer.llm, describer.tokenizer
    embed = llm.get_input_embeddings()
    with torch.no_grad():
        prompt_ids = torch.tensor(tokenizer(prompt)['input_ids'])
        sequence = torch.cat([describer.projector(queries)[0], embed(prompt_ids)], dim=0)
        tokens: list[int] = []
        for _ in range(steps):
            logits = llm(inputs_embeds=sequence[None]).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            tokens.append(token)
            sequence = torch.cat([sequence, embed(torch.tensor([token]))], dim=0)
    return tokens


def test_greedy_matches_a_written_out_decoder(describer: TextDescriber) -> None:
    """The queries go first, then the prompt with the tokenizer's BOS, then the new tokens."""
    queries = _queries(2)
    describer.options = GenerationOptions(max_new_tokens=12, prompt='what next?')
    try:
        description = describer.generate(queries)
    finally:
        describer.options = GenerationOptions()
    expected = _reference_greedy(describer, queries, 'what next?', 12)
    assert description.num_tokens == len(expected)
    decoded = describer.tokenizer.decode(expected, skip_special_tokens=True)
    assert description.text == ' '.join(
        ''.join(ch for ch in decoded if ch.isprintable() or ch.isspace()).split())


def test_queries_drive_the_words(describer: TextDescriber) -> None:
    texts = {describer.describe(_queries(seed)) for seed in range(4)}
    assert len(texts) > 1
    assert describer.describe(_queries(5)) == describer.describe(_queries(5))  # greedy: same


def test_accepts_unbatched_queries_and_refuses_a_batch(describer: TextDescriber) -> None:
    assert describer.describe(_queries(6)[0]) == describer.describe(_queries(6))
    with pytest.raises(ValueError, match=r'\[1, Q, D\]'):
        describer.generate(_queries(6, batch=2))


def test_cancel_ends_generation(describer: TextDescriber) -> None:
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 3

    describer.options = GenerationOptions(max_new_tokens=200)
    try:
        assert describer.generate(_queries(7), cancel=cancel) is None
    finally:
        describer.options = GenerationOptions()
    assert len(calls) < 10  # stopped after a few tokens, not 200


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match='text.decoding'):
        GenerationOptions(decoding='sample')
    with pytest.raises(ConfigError, match='text.max_new_tokens'):
        GenerationOptions(max_new_tokens=0)
    with pytest.raises(ConfigError, match='text.num_beams'):
        GenerationOptions(decoding='beam', num_beams=1)


def test_description_json() -> None:
    description = Description(text='open the fridge', num_tokens=4, latency_ms=12.34567,
                              model='tiny', trained=True, stamp_ns=5_000_000_007, frame_id='cam')
    data = json.loads(json.dumps(description.to_dict()))
    assert data == {'schema': DESCRIPTION_SCHEMA, 'stamp': {'sec': 5, 'nanosec': 7},
                    'frame_id': 'cam', 'text': 'open the fridge', 'num_tokens': 4,
                    'latency_ms': 12.346, 'model': 'tiny', 'trained': True, 'grounding': None}
    grounded = Description(text='x', num_tokens=1, latency_ms=1.0, model='tiny', trained=False,
                           grounding=Grounding(verbs=('take', 'open'), nouns=('knife',)))
    assert grounded.to_dict()['grounding'] == {'verbs': ['take', 'open'], 'nouns': ['knife']}


# -- caption loss -----------------------------------------------------------------------------

TEXTS = ['open the fridge door', 'take the cup', 'wash the plate in the sink', '']


def test_caption_loss_equals_the_models_own_loss(describer: TextDescriber) -> None:
    """Against transformers' built-in causal-LM loss on one row at a time (no padding)."""
    queries = _queries(8, batch=len(TEXTS))
    loss = describer.caption_loss(queries, TEXTS)
    assert loss.dim() == 0 and torch.isfinite(loss)
    tokenizer, llm = describer.tokenizer, describer.llm
    embed = llm.get_input_embeddings()
    total, count = 0.0, 0
    with torch.no_grad():
        for row, text in zip(queries, TEXTS, strict=True):
            prompt = tokenizer(describer.options.prompt)['input_ids']
            target = tokenizer(text, add_special_tokens=False)['input_ids'] + [
                tokenizer.eos_token_id]
            ids = torch.tensor(prompt + target)
            inputs = torch.cat([describer.projector(row), embed(ids)], dim=0)[None]
            labels = torch.tensor([IGNORE_INDEX] * (NUM_QUERIES + len(prompt)) + target)[None]
            out = llm(inputs_embeds=inputs, labels=labels)
            total += float(out.loss) * len(target)
            count += len(target)
    assert float(loss.detach()) == pytest.approx(total / count, rel=1e-4)


def test_caption_loss_cuts_long_texts(describer: TextDescriber) -> None:
    """Beyond max_new_tokens only the first tokens count (and no end-of-text)."""
    long_text = ' '.join(['stir the sauce in the pot'] * 20)
    describer.options = GenerationOptions(max_new_tokens=4)
    try:
        cut = describer.caption_loss(_queries(9), [long_text])
    finally:
        describer.options = GenerationOptions()
    ids = describer.tokenizer(long_text, add_special_tokens=False)['input_ids'][:4]
    prompt = describer.tokenizer(describer.options.prompt)['input_ids']
    with torch.no_grad():
        embed = describer.llm.get_input_embeddings()
        inputs = torch.cat([describer.projector(_queries(9)[0]),
                            embed(torch.tensor(prompt + ids))], dim=0)[None]
        logits = describer.llm(inputs_embeds=inputs).logits[0, -5:-1]
        expected = F.cross_entropy(logits, torch.tensor(ids))
    assert float(cut.detach()) == pytest.approx(float(expected), rel=1e-4)


def test_caption_loss_trains_the_projector_only(describer: TextDescriber) -> None:
    llm_before = {name: t.clone() for name, t in describer.llm.state_dict().items()}
    projector = TextProjector.untrained(WIDTH, describer.projector.llm_hidden_size,
                                        llm_name=describer.name, seed=1)
    trainer = TextDescriber(describer.llm, describer.tokenizer, projector, name=describer.name,
                            options=describer.options, trained=False)
    queries = _queries(10, batch=len(TEXTS)).requires_grad_(True)
    optimizer = torch.optim.Adam(projector.parameters(), lr=3e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = trainer.caption_loss(queries, TEXTS)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in describer.llm.parameters())
    for name, tensor in describer.llm.state_dict().items():
        assert torch.equal(tensor, llm_before[name]), name


def test_caption_loss_needs_one_text_per_row(describer: TextDescriber) -> None:
    with pytest.raises(ValueError, match='one text per row'):
        describer.caption_loss(_queries(11, batch=2), ['only one'])


def test_endless_tiny_llm_runs_to_max_new_tokens(tmp_path: Path, single_thread: None) -> None:
    folder = write_tiny_llm(tmp_path / 'endless', hidden_size=48, endless=True)
    describer = TextDescriber.load(folder, WIDTH, options=GenerationOptions(max_new_tokens=60))
    for seed in range(5):
        assert describer.generate(_queries(seed)).num_tokens == 60


def test_from_config(llm_dirs: dict[str, Path], single_thread: None) -> None:
    config = AnticipateConfig.from_dict({
        'model': {'hidden_size': WIDTH, 'num_heads': 4, 'value_decays': 4},
        'text': {'enabled': True, 'model_path': str(llm_dirs['qwen2']), 'max_new_tokens': 3,
                 'decoding': 'beam', 'num_beams': 2, 'prompt': 'next:'}})
    describer = TextDescriber.from_config(config)
    assert describer.options == GenerationOptions(prompt='next:', max_new_tokens=3,
                                                  decoding='beam', num_beams=2)
    assert describer.name == 'tiny-qwen2' and describer.device == torch.device('cpu')
    assert describer.generate(_queries(0)).num_tokens <= 3
