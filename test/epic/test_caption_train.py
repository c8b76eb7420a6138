"""malmm-train --task caption: the text projector learns narrations; everything else frozen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from malmm_ros.cli.extract import find_sources
from malmm_ros.cli.train import main
from malmm_ros.config import load_config
from malmm_ros.data.extraction import extract_all
from malmm_ros.labels import load_ek100_labels
from malmm_ros.model.checkpoint import (
    load_checkpoint,
    load_text_projector,
    read_checkpoint_metadata,
    save_checkpoint,
)
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.model.text import TextDescriber
from malmm_ros.model.tiny_llm import write_tiny_llm
from malmm_ros.runtime import create_encoder
from support.tiny_epic import TinyEpic, make_tiny_epic

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # extracts features and trains, end to end


@pytest.fixture(scope='module')
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyEpic, Path, Path, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp('caption')
    tiny = make_tiny_epic(root, mp4=False, bags=False)
    sources = find_sources(frames_root=str(tiny.frames_root), fps=tiny.fps)
    extract_all(sources, root / 'features', create_encoder('onnxruntime', threads=1),
                sample_fps=1.0, progress=False)
    torch.manual_seed(0)
    node = load_config(REPO / 'config' / 'anticipate.yaml')
    model = MalmmModel(node.model, load_ek100_labels(tiny.annotations_dir))
    checkpoint = save_checkpoint(root / 'anticipation.safetensors', model,
                                 training={'sample_fps': 1.0, 'memory_bank_length': 20,
                                           'task': 'anticipation', 'epoch': 9})
    llm = write_tiny_llm(root / 'llm', sentences=tuple(s.narration for s in _segments(tiny)))
    return tiny, root / 'features', checkpoint, llm


def _segments(tiny: TinyEpic):
    from malmm_ros.data.epic import load_segments
    return load_segments(tiny.train_csv)


def test_caption_training_learns_the_narrations(setup, tmp_path: Path) -> None:
    tiny, features, checkpoint, llm = setup
    config = tmp_path / 'train.yaml'
    config.write_text(yaml.safe_dump({
        'anticipate_config': str(REPO / 'config' / 'anticipate.yaml'),
        'task': 'caption', 'out_dir': str(tmp_path / 'run'), 'device': 'cpu', 'num_threads': 1,
        'data': {'features_dir': str(features), 'train_annotations': str(tiny.train_csv)},
        'caption': {'checkpoint': str(checkpoint), 'model_path': str(llm)},
        'optim': {'epochs': 6, 'batch_size': 4, 'lr': 1e-2, 'warmup_steps': 1},
    }))
    assert main(['--config', str(config), '--no-progress']) == 0
    history = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    losses = [h['caption_loss'] for h in history]
    # A random tiny LLM is hard to steer with a prefix; the loss still falls steadily.
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(b <= a + 1e-3 for a, b in zip(losses, losses[1:], strict=False)), losses
    narrations = {s.narration for s in _segments(tiny)}
    assert all(e['target'] in narrations for h in history for e in h['examples'])

    out = tmp_path / 'run' / 'checkpoint.safetensors'
    # The protocol is inherited from the anticipation checkpoint; task and epoch are this run's.
    training = read_checkpoint_metadata(out)['training']
    assert (training['task'], training['epoch'], training['sample_fps']) == ('caption', 6, 1.0)
    projector = load_text_projector(out)
    assert projector is not None and projector.llm_name == 'llm'
    width = load_config(REPO / 'config' / 'anticipate.yaml').model.hidden_size
    describer = TextDescriber.load(llm, width, projector=projector)
    assert describer.trained
    assert isinstance(describer.describe(torch.zeros(1, 32, width)), str)
    # The anticipation model is carried over unchanged.
    before, after = load_checkpoint(checkpoint), load_checkpoint(out)
    for name, value in before.state_dict().items():
        assert torch.equal(after.state_dict()[name], value), name


def test_caption_needs_a_checkpoint_and_an_llm(setup, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    tiny, features, checkpoint, _ = setup
    base = ['--task', 'caption', '--config', str(REPO / 'config' / 'train.yaml'), '--set',
            f'data.features_dir={features}', '--set', f'data.train_annotations={tiny.train_csv}',
            '--set', f'out_dir={tmp_path / "run"}', '--no-progress']
    assert main(base) == 2
    assert 'caption.checkpoint is not set' in capsys.readouterr().err
    assert main([*base, '--set', f'caption.checkpoint={checkpoint}']) == 2
    assert 'no LLM: set caption.model_path' in capsys.readouterr().err
    assert main([*base, '--set', f'caption.checkpoint={checkpoint}', '--set',
                 f'caption.model_path={tmp_path / "missing"}']) == 2
    assert 'missing' in capsys.readouterr().err
