"""malmm-export checkpoint --untrained and malmm-eval on what it writes: the smoke path of a new
user without a trained checkpoint, and the refusals around it.

Features mode runs on the tiny EK-format dataset (test/epic/tiny_epic.py) with random feature
files: an untrained model needs no real encoder output to show that the tools run.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from malmm_ros.cli import evaluate as eval_cli
from malmm_ros.cli import export as export_cli
from malmm_ros.config import load_config
from malmm_ros.data.features import write_video_features
from malmm_ros.labels import LabelMaps
from malmm_ros.model.checkpoint import (
    checkpoint_is_trained,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
)
from malmm_ros.pipeline.anticipation import AnticipationPipeline
from support.tiny_epic import NOUN_CLASSES, VERB_CLASSES, TinyEpic, make_tiny_epic

MODEL = {'num_layers': 2, 'hidden_size': 32, 'num_heads': 2, 'intermediate_size': 64,
         'num_queries': 8, 'encoder_width': 32}
M = 4

pytestmark = pytest.mark.usefixtures('single_thread')  # test/conftest.py


def run(main, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def one_error_line(stderr: str) -> str:
    """The CLI's only stderr line, which must be an ERROR line (no traceback)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('ERROR: '), stderr
    return lines[0]


@pytest.fixture(scope='module')
def node_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp('config') / 'anticipate.yaml'
    parameters = {'sample_fps': 1.0, 'memory_bank_length': M, 'num_threads': 1,
                  'model': MODEL}
    path.write_text(yaml.safe_dump({'/**': {'ros__parameters': parameters}}))
    return path


@pytest.fixture(scope='module')
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyEpic:
    return make_tiny_epic(tmp_path_factory.mktemp('epic'), frames=False, mp4=False,
                          bags=False)


@pytest.fixture(scope='module')
def features(tiny: TinyEpic) -> Path:
    """Random 49 x 1280 feature files at 1 fps over each tiny video."""
    folder = tiny.root / 'features'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for video_id in tiny.video_ids:
        times = np.arange(0.0, tiny.seconds, 1.0)
        tokens = rng.standard_normal((times.size, 49, 1280)).astype(np.float16)
        write_video_features(folder / f'{video_id}.safetensors', video_id, times, tokens,
                             metadata={'backend': 'test'})
    return folder


def export_untrained(out: Path, *extra: str) -> str:
    code, stdout, stderr = run(export_cli.main, 'checkpoint', '--untrained', '--out', str(out),
                               *extra)
    assert code == 0, stderr
    return stdout


# -- malmm-export checkpoint --------------------------------------------------------------------


def test_untrained_checkpoint_is_the_pipelines_untrained_model(tmp_path: Path,
                                                               node_config: Path) -> None:
    out = tmp_path / 'untrained.safetensors'
    stdout = export_untrained(out, '--config', str(node_config))
    assert stdout.startswith(f'wrote {out}: UNTRAINED')
    assert not checkpoint_is_trained(out)
    training = read_checkpoint_metadata(out)['training']
    assert training == {'untrained': True, 'seed': 0, 'memory_bank_length': M,
                        'sample_fps': 1.0}
    model = load_checkpoint(out)
    assert model.config.architecture() == load_config(node_config).model.architecture()
    assert model.labels == LabelMaps(verbs=LabelMaps.placeholder().verbs,
                                     nouns=LabelMaps.placeholder().nouns)
    # The node without a checkpoint runs exactly these weights (same seed, same labels).
    pipeline = AnticipationPipeline(load_config(node_config), encoder=object())
    assert pipeline.trained is False
    expected = pipeline.model.state_dict()
    got = model.state_dict()
    assert list(got) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_labels_dir_gives_ek100_names_and_export_is_reproducible(
        tmp_path: Path, node_config: Path, tiny: TinyEpic) -> None:
    first, second = tmp_path / 'a.safetensors', tmp_path / 'nested' / 'b.safetensors'
    export_untrained(first, '--config', str(node_config), '--labels-dir',
                     str(tiny.annotations_dir))
    export_untrained(second, '--config', str(node_config), '--labels-dir',
                     str(tiny.annotations_dir))
    a, b = load_checkpoint(first), load_checkpoint(second)
    assert [c.name for c in a.labels.verbs] == list(VERB_CLASSES)
    assert [c.name for c in a.labels.nouns] == list(NOUN_CLASSES)
    assert a.labels == b.labels
    for name, tensor in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], tensor), name


def test_refused_without_untrained(tmp_path: Path) -> None:
    out = tmp_path / 'ck.safetensors'
    code, _, stderr = run(export_cli.main, 'checkpoint', '--out', str(out))
    assert code == 1
    line = one_error_line(stderr)
    assert '--untrained' in line and 'trained checkpoints come from malmm-train' in line
    assert not out.exists()


def test_trained_checkpoint_is_not_overwritten_without_force(tmp_path: Path,
                                                             node_config: Path) -> None:
    out = tmp_path / 'trained.safetensors'
    export_untrained(out, '--config', str(node_config))
    save_checkpoint(out, load_checkpoint(out), training={'epoch': 3})  # now a "trained" one
    assert checkpoint_is_trained(out)
    code, _, stderr = run(export_cli.main, 'checkpoint', '--untrained', '--out', str(out),
                          '--config', str(node_config))
    assert code == 1
    assert 'holds a trained checkpoint; pass --force' in one_error_line(stderr)
    assert read_checkpoint_metadata(out)['training'] == {'epoch': 3}
    export_untrained(out, '--config', str(node_config), '--force')
    assert not checkpoint_is_trained(out)


def test_missing_labels_dir_is_an_error(tmp_path: Path) -> None:
    code, _, stderr = run(export_cli.main, 'checkpoint', '--untrained', '--out',
                          str(tmp_path / 'ck.safetensors'), '--labels-dir',
                          str(tmp_path / 'absent'))
    assert code == 1
    assert f'--labels-dir {tmp_path / "absent"} is not a folder' in one_error_line(stderr)


# -- malmm-eval on an untrained checkpoint --------------------------------------------------


def evaluate_features(tiny: TinyEpic, features: Path, checkpoint: Path, out: Path
                      ) -> tuple[dict, str, str]:
    code, stdout, stderr = run(eval_cli.main, '--features', str(features), '--annotations',
                               str(tiny.annotations_csv), '--checkpoint', str(checkpoint),
                               '--out', str(out), '--no-progress')
    assert code == 0, stderr
    return json.loads((out / 'metrics.json').read_text()), stdout, \
        (out / 'report' / 'summary.md').read_text()


def test_eval_round_trip_says_untrained(tmp_path: Path, node_config: Path, tiny: TinyEpic,
                                        features: Path) -> None:
    untrained = tmp_path / 'untrained.safetensors'
    export_untrained(untrained, '--config', str(node_config), '--labels-dir',
                     str(tiny.annotations_dir))
    record, stdout, summary = evaluate_features(tiny, features, untrained, tmp_path / 'eval')
    assert record['trained'] is False
    assert record['checkpoint'] == str(untrained.resolve())
    assert record['segments']['segments'] == len(tiny.segments)
    assert record['metrics']['overall']['action']['count'] == len(tiny.segments)
    assert 'UNTRAINED checkpoint' in stdout
    title, blank, warning = summary.splitlines()[:3]
    assert title.startswith('# malmm-eval: features mode') and blank == ''
    assert 'UNTRAINED checkpoint' in warning and 'chance-level' in warning

    # The same weights marked as trained: the report no longer warns.
    trained = tmp_path / 'trained.safetensors'
    save_checkpoint(trained, load_checkpoint(untrained),
                    training={'memory_bank_length': M, 'sample_fps': 1.0})
    record, stdout, summary = evaluate_features(tiny, features, trained,
                                                tmp_path / 'eval-trained')
    assert record['trained'] is True
    assert 'UNTRAINED' not in stdout and 'UNTRAINED' not in summary


@pytest.mark.parametrize('given', [None, 'missing.safetensors'])
def test_eval_missing_checkpoint_says_how_to_make_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: TinyEpic, features: Path,
        given: str | None) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths, and malmm-train's default output, from here
    tried = (tmp_path / 'runs' / 'train' / 'checkpoint.safetensors' if given is None
             else tmp_path / given)
    args = ['--features', str(features), '--annotations', str(tiny.annotations_csv),
            '--out', 'eval', '--no-progress']
    code, _, stderr = run(eval_cli.main, *args,
                          *(['--checkpoint', given] if given is not None else []))
    assert code == 1
    line = one_error_line(stderr)
    assert f'checkpoint {tried} ' in line  # absolute, though given relative or not at all
    advice = 'malmm-export checkpoint --untrained --out '
    assert f'No trained checkpoint? Make an untrained one to smoke-test with: {advice}' in line
    assert not (tmp_path / 'eval').exists()

    # Following the advice word for word makes the same malmm-eval command work.
    command = shlex.split(line[line.index(advice):])
    assert command[:2] == ['malmm-export', 'checkpoint'] and command[-1] == str(tried)
    code, _, stderr = run(export_cli.main, *command[1:])
    assert code == 0, stderr
    code, _, stderr = run(eval_cli.main, *args,
                          *(['--checkpoint', given] if given is not None else []))
    assert code == 0, stderr
    assert json.loads((tmp_path / 'eval' / 'metrics.json').read_text())['trained'] is False
