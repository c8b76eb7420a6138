"""malmm-train on a tiny EK-format dataset: features -> checkpoint -> the pipeline loads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from malmm_ros.cli.train import main
from malmm_ros.data.extraction import extract_all
from malmm_ros.model.checkpoint import read_checkpoint_metadata
from malmm_ros.pipeline.anticipation import AnticipationPipeline
from malmm_ros.runtime import create_encoder
from support.tiny_epic import TinyEpic, make_tiny_epic

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # extracts features and trains, end to end


@pytest.fixture(scope='module')
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyEpic, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp('tiny_epic')
    tiny = make_tiny_epic(root, mp4=False, bags=False)
    from malmm_ros.cli.extract import find_sources

    sources = find_sources(frames_root=str(tiny.frames_root), fps=tiny.fps)
    encoder = create_encoder('onnxruntime', threads=1)
    results = extract_all(sources, root / 'features', encoder, sample_fps=1.0, progress=False)
    assert all(r.status == 'extracted' for r in results), results
    return tiny, root / 'features'


def write_config(path: Path, tiny: TinyEpic, features: Path, **data_changes) -> Path:
    config = {
        'anticipate_config': str(REPO / 'config' / 'anticipate.yaml'),
        'out_dir': str(path.parent / 'run'),
        'device': 'cpu',
        'num_threads': 1,
        'data': {'features_dir': str(features), 'train_annotations': str(tiny.train_csv),
                 'annotations_dir': str(tiny.annotations_dir), **data_changes},
        'optim': {'epochs': 3, 'batch_size': 4, 'warmup_steps': 1, 'lr': 1e-3},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_cli_writes_a_checkpoint_the_pipeline_loads(dataset, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    tiny, features = dataset
    config = write_config(tmp_path / 'train.yaml', tiny, features)
    assert main(['--config', str(config), '--no-progress']) == 0
    checkpoint = tmp_path / 'run' / 'checkpoint.safetensors'
    assert f'checkpoint: {checkpoint}' in capsys.readouterr().out
    meta = read_checkpoint_metadata(checkpoint)
    training = meta['training']
    assert (training['tau_a'], training['tau_o'], training['sample_fps']) == (1.0, 10.0, 1.0)
    assert training['memory_bank_length'] == 20
    pairs = sorted({(s.verb_class, s.noun_class) for s in tiny.segments})
    assert [(a['verb_id'], a['noun_id']) for a in meta['labels']['actions']] == pairs
    # The early segments (one per video, ts - ta < 0) have no observation: not trained on.
    early = sum(1 for s in tiny.segments if s.start_s < 1.0)
    assert training['train_windows']['no_observation'] == early == len(tiny.video_ids)
    assert training['train_windows']['windows'] == len(tiny.segments) - early
    history = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert [h['epoch'] for h in history] == [1, 2, 3]

    pipeline = AnticipationPipeline.from_config(REPO / 'config' / 'anticipate.yaml',
                                                checkpoint=str(checkpoint), num_threads=1)
    prediction = None
    for second in range(4):
        index = int(second * tiny.fps)
        prediction = pipeline.push(tiny.frame(tiny.video_ids[0], index), second * 10**9) \
            or prediction
    assert prediction is not None and prediction.trained
    names = {f'{a.name}' for a in prediction.actions}
    vocabulary = {a['name'] for a in meta['labels']['actions']}
    assert names <= vocabulary  # actions come from the trained head's vocabulary
    assert len(prediction.actions) == min(5, len(vocabulary))


def test_stop_and_resume(dataset, tmp_path: Path) -> None:
    tiny, features = dataset
    config = write_config(tmp_path / 'train.yaml', tiny, features)
    assert main(['--config', str(config), '--no-progress', '--epochs-this-run', '1']) == 0
    history = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert [h['epoch'] for h in history] == [1]
    assert main(['--config', str(config), '--no-progress', '--resume']) == 0
    history = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert [h['epoch'] for h in history] == [1, 2, 3]


def test_errors_are_clear(dataset, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tiny, features = dataset
    config = write_config(tmp_path / 'train.yaml', tiny, features, train_annotations='')
    assert main(['--config', str(config), '--no-progress']) == 2
    assert 'data.train_annotations is not set' in capsys.readouterr().err

    empty = tmp_path / 'no_features'
    empty.mkdir()
    config = write_config(tmp_path / 'train2.yaml', tiny, empty)
    assert main(['--config', str(config), '--no-progress']) == 2
    assert 'no training windows' in capsys.readouterr().err

    assert main(['--config', str(config), '--set', 'optim.lr=-1', '--no-progress']) == 2
    assert 'optim.lr must be in' in capsys.readouterr().err
    # 1e1 is a float, as in the YAML files (not the string YAML 1.1 makes of it)
    assert main(['--config', str(config), '--set', 'optim.lr=1e1', '--no-progress']) == 2
    assert 'optim.lr must be in' in capsys.readouterr().err
    assert main(['--config', str(config), '--set', 'optim.lr', '--no-progress']) == 2
    assert '--set expects key=value' in capsys.readouterr().err

    config = write_config(tmp_path / 'train3.yaml', tiny, features)
    assert main(['--config', str(config), '--no-progress', '--resume']) == 2
    assert 'no training state' in capsys.readouterr().err


def test_pipeline_warns_when_the_memory_differs_from_training(dataset, tmp_path: Path,
                                                              caplog) -> None:
    tiny, features = dataset
    config = write_config(tmp_path / 'train.yaml', tiny, features)
    assert main(['--config', str(config), '--no-progress', '--set', 'optim.epochs=1']) == 0
    checkpoint = str(tmp_path / 'run' / 'checkpoint.safetensors')
    same = AnticipationPipeline.from_config(REPO / 'config' / 'anticipate.yaml',
                                            checkpoint=checkpoint, num_threads=1)
    assert same.protocol_warnings == []
    with caplog.at_level('WARNING', logger='malmm_ros.pipeline.anticipation'):
        other = AnticipationPipeline.from_config(REPO / 'config' / 'anticipate.yaml',
                                                 checkpoint=checkpoint, num_threads=1,
                                                 memory_bank_length=8, sample_fps=2.0)
    assert len(other.protocol_warnings) == 2
    assert 'memory_bank_length is 8 but checkpoint' in caplog.text
    assert 'trained with 1.0' in caplog.text
