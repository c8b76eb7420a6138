"""A text projector inside a checkpoint: round trip, old checkpoints, and every mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from malmm_ros.config import ModelConfig
from malmm_ros.errors import CheckpointError
from malmm_ros.labels import LabelMaps
from malmm_ros.model.checkpoint import (
    TEXT_PROJECTOR_PREFIX,
    load_checkpoint,
    load_text_projector,
    read_checkpoint_metadata,
    save_checkpoint,
)
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.model.text import TextDescriber, TextProjector
from malmm_ros.model.tiny_llm import write_tiny_llm

CONFIG = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64,
                     encoder_width=24, value_decays=4)  # heads of 8 channels: 4 of them decays
LABELS = LabelMaps.placeholder(5, 7)
FEATURE_DIM, NUM_TOKENS = 40, 6
PROMPT = 'What comes next?'


def _model() -> MalmmModel:
    torch.manual_seed(0)
    return MalmmModel(CONFIG, LABELS, feature_dim=FEATURE_DIM, num_tokens=NUM_TOKENS).eval()


def _projector(llm_name: str, llm_hidden: int, seed: int = 5) -> TextProjector:
    projector = TextProjector.untrained(CONFIG.hidden_size, llm_hidden, llm_name=llm_name,
                                        prompt=PROMPT, seed=seed)
    with torch.no_grad():  # distinctive values, not an initialiser's
        projector.proj.bias.copy_(torch.linspace(-1, 1, llm_hidden))
    return projector


def _raw(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework='pt') as handle:
        return handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


@pytest.fixture(scope='module')
def llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llm(tmp_path_factory.mktemp('llm') / 'tiny-llama', hidden_size=48)


@pytest.fixture(scope='module')
def other_llm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llm(tmp_path_factory.mktemp('llm') / 'tiny-qwen2', family='qwen2',
                          hidden_size=64)


@pytest.fixture(scope='module')
def with_projector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TextProjector]:
    projector = _projector('tiny-llama', 48)
    path = tmp_path_factory.mktemp('ckpt') / 'with_text.safetensors'
    save_checkpoint(path, _model(), training={'task': 'caption'}, text_projector=projector)
    return path, projector


@pytest.fixture(scope='module')
def without_projector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp('ckpt') / 'plain.safetensors'
    save_checkpoint(path, _model())
    return path


# -- round trip -------------------------------------------------------------------------------


def test_projector_round_trip(with_projector: tuple[Path, TextProjector]) -> None:
    path, projector = with_projector
    loaded = load_text_projector(path)
    assert loaded is not None
    assert loaded.metadata() == {'llm_name': 'tiny-llama', 'llm_hidden_size': 48,
                                 'qformer_hidden_size': CONFIG.hidden_size, 'prompt': PROMPT}
    assert loaded.source == str(path)
    for name, tensor in projector.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_projector_is_stored_under_its_own_prefix(with_projector: tuple[Path, TextProjector]
                                                  ) -> None:
    path, _ = with_projector
    header, tensors = _raw(path)
    text_names = sorted(name for name in tensors if name.startswith(TEXT_PROJECTOR_PREFIX))
    assert text_names == ['text_projector.proj.bias', 'text_projector.proj.weight']
    assert tuple(tensors['text_projector.proj.weight'].shape) == (48, CONFIG.hidden_size)
    assert json.loads(header['malmm_ros'])['text_projector']['llm_name'] == 'tiny-llama'
    assert read_checkpoint_metadata(path)['training'] == {'task': 'caption'}


def test_main_model_loads_with_and_without_projector(
        with_projector: tuple[Path, TextProjector], without_projector: Path) -> None:
    reference = _model()
    for path in (with_projector[0], without_projector):
        model = load_checkpoint(path, CONFIG)
        for name, tensor in reference.state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), (path, name)


def test_no_projector_in_a_plain_checkpoint(without_projector: Path) -> None:
    assert load_text_projector(without_projector) is None


def test_checkpoint_projector_drives_its_llm(with_projector: tuple[Path, TextProjector],
                                             llm_dir: Path, single_thread: None) -> None:
    path, projector = with_projector
    describer = TextDescriber.load(llm_dir, CONFIG.hidden_size,
                                   projector=load_text_projector(path))
    assert describer.trained is True
    queries = torch.randn(1, 4, CONFIG.hidden_size)
    assert torch.equal(describer.projector(queries), projector(queries))
    description = describer.generate(queries)
    assert description is not None and description.trained is True


def test_save_refuses_a_projector_of_another_width(tmp_path: Path) -> None:
    projector = TextProjector(CONFIG.hidden_size + 1, 48, llm_name='tiny-llama')
    with pytest.raises(ValueError, match='width 33'):
        save_checkpoint(tmp_path / 'x.safetensors', _model(), text_projector=projector)


# -- mismatches -------------------------------------------------------------------------------


def test_projector_for_another_llm(with_projector: tuple[Path, TextProjector],
                                   other_llm_dir: Path, single_thread: None) -> None:
    path, _ = with_projector
    with pytest.raises(CheckpointError, match=(
            f"text projector of {path} does not fit: it was trained for LLM 'tiny-llama', "
            "text.model_path holds 'tiny-qwen2'; LLM hidden size 48 vs 64")):
        TextDescriber.load(other_llm_dir, CONFIG.hidden_size,
                           projector=load_text_projector(path))


def test_projector_with_the_right_name_but_wrong_size(tmp_path: Path, llm_dir: Path,
                                                      single_thread: None) -> None:
    path = tmp_path / 'renamed.safetensors'
    save_checkpoint(path, _model(), text_projector=_projector('tiny-llama', 40))
    with pytest.raises(CheckpointError, match='LLM hidden size 40 vs 48'):
        TextDescriber.load(llm_dir, CONFIG.hidden_size, projector=load_text_projector(path))


def test_projector_for_another_qformer_width(with_projector: tuple[Path, TextProjector],
                                             llm_dir: Path, single_thread: None) -> None:
    with pytest.raises(CheckpointError, match='Q-Former width 32 vs model.hidden_size 64'):
        TextDescriber.load(llm_dir, 64, projector=load_text_projector(with_projector[0]))


def _rewrite(source: Path, target: Path, edit_meta=None, edit_tensors=None) -> Path:
    header, tensors = _raw(source)
    metadata = json.loads(header['malmm_ros'])
    if edit_meta:
        edit_meta(metadata)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(target), metadata={'malmm_ros': json.dumps(metadata)})
    return target


@pytest.mark.parametrize('edit, message', [
    (lambda m: m.update(text_projector=[1, 2]), '"text_projector" must be an object'),
    (lambda m: m['text_projector'].pop('llm_name'), 'text_projector.llm_name must be a string'),
    (lambda m: m['text_projector'].update(llm_hidden_size=0),
     'text_projector.llm_hidden_size must be a positive integer'),
    (lambda m: m['text_projector'].update(qformer_hidden_size='32'),
     'text_projector.qformer_hidden_size must be a positive integer'),
    (lambda m: m['text_projector'].update(llm_hidden_size=50), 'do not fit its metadata'),
])
def test_bad_projector_metadata(tmp_path: Path, with_projector: tuple[Path, TextProjector],
                                edit, message: str) -> None:
    path = _rewrite(with_projector[0], tmp_path / 'bad.safetensors', edit_meta=edit)
    with pytest.raises(CheckpointError, match=message):
        load_text_projector(path)
    load_checkpoint(path, CONFIG)  # the main model does not care


def test_projector_metadata_without_tensors(tmp_path: Path,
                                            with_projector: tuple[Path, TextProjector]) -> None:
    def drop(tensors: dict) -> None:
        for name in [n for n in tensors if n.startswith(TEXT_PROJECTOR_PREFIX)]:
            del tensors[name]

    path = _rewrite(with_projector[0], tmp_path / 'no_tensors.safetensors', edit_tensors=drop)
    with pytest.raises(CheckpointError, match='text projector tensors {} do not fit'):
        load_text_projector(path)


def test_stray_model_tensor_is_still_refused(tmp_path: Path,
                                             with_projector: tuple[Path, TextProjector]) -> None:
    """Ignoring the projector's keys does not loosen the main model's strict check."""
    path = _rewrite(with_projector[0], tmp_path / 'stray.safetensors',
                    edit_tensors=lambda t: t.update({'heads.extra': torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected \['heads.extra'\]"):
        load_checkpoint(path, CONFIG)
