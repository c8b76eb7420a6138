"""The whole path on the tiny EK-format dataset: malmm-extract -> malmm-train -> malmm-eval in
direct, features and live mode, with the real encoder, real bags and, for live mode, the node
and the evaluator as separate processes over real DDS.

On the fixture the photo on screen decides the next action, so a trained model predicts it and
an untrained one cannot. With 5 verbs and 4 actions top-5 is almost always a hit, so the checks
use top-1. Segments at 0.5 s (ts - ta < 0) are misses in every mode: 10 of 12 are scorable.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from malmm_ros.cli import evaluate as eval_cli
from malmm_ros.cli import extract as extract_cli
from malmm_ros.cli.train import run as train_run
from malmm_ros.model.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.training.config import load_train_config
from support.domains import domain_id
from support.tiny_epic import TinyEpic, make_tiny_epic

DOMAIN_ID = domain_id(__file__)  # live mode's node and evaluator
SCRIPT = Path(sys.executable).with_name('malmm-eval')
MODEL = {'num_layers': 2, 'hidden_size': 64, 'num_heads': 2, 'intermediate_size': 128,
         'num_queries': 8, 'encoder_width': 64}
M = 4


pytestmark = pytest.mark.usefixtures('single_thread')  # test/conftest.py


@dataclass
class Trained:
    tiny: TinyEpic
    root: Path
    features: Path
    config: Path  # the node config the checkpoint was trained with
    checkpoint: Path
    untrained: Path


def write_node_config(path: Path, **changes: object) -> Path:
    parameters = {'sample_fps': 1.0, 'memory_bank_length': M, 'num_threads': 1,
                  'model': dict(MODEL)}
    for key, value in changes.items():
        if key in MODEL:
            parameters['model'][key] = value
        else:
            parameters[key] = value
    path.write_text(yaml.safe_dump({'/**': {'ros__parameters': parameters}}))
    return path


@pytest.fixture(scope='module')
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp('e2e')
    tiny = make_tiny_epic(root / 'epic', mp4=False)  # 2 videos x 20 s at 30 fps
    features = root / 'features'
    # The fixture's frames follow its 30 fps camera, not EK-100's 60 fps numbering.
    code = extract_cli.main(['--frames-root', str(tiny.frames_root), '--out', str(features),
                             '--sample-fps', '4', '--video-info', str(tiny.video_info_csv),
                             '--threads', '1', '--quiet'])
    assert code == 0
    config = write_node_config(root / 'anticipate.yaml')
    train_config = load_train_config(None, {
        'anticipate_config': str(config), 'out_dir': str(root / 'run'), 'device': 'cpu',
        'num_threads': 1, 'data.features_dir': str(features),
        'data.train_annotations': str(tiny.train_csv),
        'data.annotations_dir': str(tiny.annotations_dir), 'optim.epochs': 30,
        'optim.batch_size': 4, 'optim.lr': 3e-3, 'optim.warmup_steps': 5,
        'optim.label_smoothing': 0.0})
    result = train_run(train_config, progress=False)
    assert result.checkpoint is not None
    # The same architecture, labels and protocol with random weights, marked untrained as
    # malmm-export checkpoint --untrained marks its own: what training bought.
    model = load_checkpoint(result.checkpoint)
    info = read_checkpoint_metadata(result.checkpoint)['training']
    torch.manual_seed(1)
    fresh = MalmmModel(model.config, model.labels, feature_dim=model.feature_dim,
                       num_tokens=model.num_tokens)
    untrained = save_checkpoint(root / 'untrained.safetensors', fresh, training={
        'untrained': True,
        **{key: info[key] for key in ('tau_a', 'tau_o', 'sample_fps', 'memory_bank_length')}})
    return Trained(tiny, root, features, config, result.checkpoint, untrained)


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = eval_cli.main([*args, '--no-progress'])
    return code, out.getvalue(), err.getvalue()


def direct(trained: Trained, video_id: str, out: Path, checkpoint: Path | None = None,
           *extra: str) -> dict:
    tiny = trained.tiny
    code, stdout, stderr = run_cli(
        '--bag', str(tiny.bags[video_id]), '--annotations', str(tiny.annotations_csv),
        '--video-id', video_id, '--checkpoint', str(checkpoint or trained.checkpoint),
        '--config', str(trained.config), '--out', str(out), *extra)
    assert code == 0, stderr
    return json.loads((out / 'metrics.json').read_text())


def top1_hits(out: Path, trained: Trained) -> dict[str, bool]:
    """narration_id -> whether the top-1 action is right, read from the submission (the
    per-segment output); a segment without a prediction (all zeros) is a miss."""
    submission = json.loads((out / 'submission.json').read_text())
    truth = {s.narration_id: f'{s.verb_class},{s.noun_class}' for s in trained.tiny.segments}
    hits = {}
    for narration, entry in submission['results'].items():
        actions = entry['action']
        best = max(actions, key=actions.get)
        hits[narration] = actions[best] > 0 and best == truth[narration]
    return hits


def direct_hits(trained: Trained, outs: dict[str, Path]) -> dict[str, bool]:
    return {k: v for video_id in trained.tiny.video_ids
            for k, v in top1_hits(outs[video_id], trained).items()}


def overall(record: dict, task: str = 'action', metric: str = 'top1_accuracy') -> float:
    return record['metrics']['overall'][task][metric]


# --- training --------------------------------------------------------------------------------


def test_training_runs_every_epoch_and_lowers_the_loss(trained: Trained) -> None:
    # Speed is bench/train_bench.py's business, not a test's.
    history = json.loads((trained.root / 'run' / 'metrics.json').read_text())
    assert len(history) == 30 and history[-1]['train_loss'] < history[0]['train_loss']


# --- direct and features mode -----------------------------------------------------------------


@pytest.fixture(scope='module')
def direct_runs(trained: Trained) -> dict[str, Path]:
    outs = {}
    for video_id in trained.tiny.video_ids:
        outs[video_id] = trained.root / f'direct_{video_id}'
        direct(trained, video_id, outs[video_id])
    return outs


def test_direct_mode_outputs(trained: Trained, direct_runs: dict[str, Path]) -> None:
    out = direct_runs['P02_03']
    record = json.loads((out / 'metrics.json').read_text())
    assert record['mode'] == 'direct'
    assert record['trained'] is True
    assert record['checkpoint'] == str(trained.checkpoint.resolve())
    assert record['segments'] == {'segments': 6, 'scored': 5, 'no_observation': 1,
                                  'no_prediction': 0}
    assert record['timeline']['frames'] == 600 and record['timeline']['predictions'] == 20
    assert record['settings']['memory_bank_length'] == M
    assert record['settings']['action_scores'] == 'action head (4 actions)'
    # P02 is the unseen participant; 'open' (verb 3) and 'lid' (noun 6) are the tail.
    assert record['metrics']['unseen']['verb']['count'] == 6
    assert record['metrics']['tail']['verb']['count'] == 2
    assert record['metrics']['tail']['action']['count'] == 3
    submission = json.loads((out / 'submission.json').read_text())
    assert sorted(submission['results']) == [f'P02_03_{i}' for i in range(6)]
    assert len(submission['results']['P02_03_3']['verb']) == 5  # the fixture's 5 verbs
    report = sorted(p.name for p in (out / 'report').iterdir())
    assert report == ['confusion_verbs.png', 'recall_actions.png', 'recall_nouns.png',
                      'recall_verbs.png', 'summary.md']


def test_a_trained_model_beats_an_untrained_one(trained: Trained,
                                                direct_runs: dict[str, Path]) -> None:
    right = direct_hits(trained, direct_runs)
    outs = {}
    for video_id in trained.tiny.video_ids:
        outs[video_id] = trained.root / f'untrained_{video_id}'
        direct(trained, video_id, outs[video_id], trained.untrained)
    untrained = direct_hits(trained, outs)
    for out in outs.values():  # the reports say which is which
        assert json.loads((out / 'metrics.json').read_text())['trained'] is False
        assert 'UNTRAINED checkpoint' in (out / 'report' / 'summary.md').read_text()
    assert 'UNTRAINED' not in (direct_runs['P01_01'] / 'report' / 'summary.md').read_text()
    assert len(right) == len(untrained) == 12
    assert not right['P01_01_0'] and not right['P02_03_0']  # ts - ta < 0: always misses
    trained_accuracy = np.mean(list(right.values()))
    untrained_accuracy = np.mean(list(untrained.values()))
    # At least 8 of the 10 scorable segments; 4 equally frequent actions: a model that
    # ignores the photo is right on about a quarter of them.
    assert trained_accuracy >= 8 / 12, right
    assert trained_accuracy >= untrained_accuracy + 0.25, (right, untrained)


def test_features_mode_agrees_with_direct_mode(trained: Trained,
                                               direct_runs: dict[str, Path]) -> None:
    out = trained.root / 'features_eval'
    code, stdout, stderr = run_cli('--features', str(trained.features), '--annotations',
                                   str(trained.tiny.annotations_csv), '--checkpoint',
                                   str(trained.checkpoint), '--out', str(out))
    assert code == 0, stderr
    record = json.loads((out / 'metrics.json').read_text())
    assert record['mode'] == 'features' and record['trained'] is True
    assert record['windows'] == {'windows': 10, 'no_observation': 2, 'no_features': 0,
                                 'feature_gap': 0}
    assert record['settings']['tau_o'] == 10.0 and record['settings']['sample_fps'] == 1.0
    from_features = top1_hits(out, trained)
    from_bags = direct_hits(trained, direct_runs)
    assert from_features.keys() == from_bags.keys()
    # Different frames (the features' 4 fps grid vs the bag's 1 fps sampling) and memories
    # (one window vs the whole video) but the same photo on screen: broadly the same answers.
    agree = np.mean([from_features[k] == from_bags[k] for k in from_features])
    assert agree >= 10 / 12, (from_features, from_bags)
    assert np.mean(list(from_features.values())) >= 8 / 12
    for task in ('verb', 'noun', 'action'):
        ours = overall(record, task)
        theirs = np.mean([overall(json.loads((direct_runs[v] / 'metrics.json').read_text()),
                                  task) for v in trained.tiny.video_ids])
        assert abs(ours - theirs) <= 2 / 12, (task, ours, theirs)


# --- clear errors ------------------------------------------------------------------------------


def test_errors_name_what_is_wrong(trained: Trained) -> None:
    tiny = trained.tiny
    base = ['--annotations', str(tiny.annotations_csv), '--checkpoint',
            str(trained.checkpoint), '--config', str(trained.config),
            '--out', str(trained.root / 'errors')]
    bag = ['--bag', str(tiny.bags['P01_01'])]
    garbage = trained.root / 'garbage.safetensors'
    garbage.write_bytes(b'\x00' * 64)
    other_model = write_node_config(trained.root / 'layers.yaml', num_layers=3)
    other_memory = write_node_config(trained.root / 'memory.yaml', memory_bank_length=8)
    cases = [
        ([*bag, '--video-id', 'P09_99', *base],
         "video 'P09_99' has no segments in"),
        ([*bag, '--video-id', 'P01_01', *base, '--config', str(other_memory)],
         'memory_bank_length is 8 but checkpoint'),
        ([*bag, '--video-id', 'P01_01', *base, '--config', str(other_model)],
         'does not match the model section'),
        ([*bag, '--video-id', 'P01_01', *base, '--checkpoint', str(garbage)],
         'is not a readable safetensors file'),
        ([*bag, '--video-id', 'P01_01', *base, '--annotations', str(trained.root / 'no.csv')],
         'does not exist'),
        (['--bag', str(trained.root / 'nothing'), '--video-id', 'P01_01', *base],
         'does not exist'),
        (['--features', str(trained.root / 'nothing'), *base],
         'feature folder'),
    ]
    for args, message in cases:
        code, _, stderr = run_cli(*args)
        assert code == 1, (args, stderr)
        assert stderr.startswith('ERROR: ') and message in stderr, stderr
    # A CSV whose classes the checkpoint does not know.
    rows = tiny.annotations_csv.read_text().splitlines()
    header = rows[0].split(',')
    cells = rows[1].split(',')
    cells[header.index('verb_class')] = '42'
    bad = trained.root / 'bad_classes.csv'
    bad.write_text('\n'.join([rows[0], ','.join(cells)]) + '\n')
    code, _, stderr = run_cli(*bag, '--video-id', 'P01_01', *base, '--annotations', str(bad))
    assert code == 1 and 'annotations and checkpoint disagree' in stderr
    assert "line 2, column 'verb_class'" in stderr
    with pytest.raises(SystemExit) as usage:
        run_cli(*bag, *base)  # no --video-id
    assert usage.value.code == 2


# --- live mode ---------------------------------------------------------------------------------


def test_live_mode_over_dds(trained: Trained) -> None:
    tiny = trained.tiny
    out = trained.root / 'live'
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST', PYTHONUNBUFFERED='1')
    command = [str(SCRIPT), '--bag', str(tiny.bags['P02_03']), '--annotations',
               str(tiny.annotations_csv), '--video-id', 'P02_03', '--checkpoint',
               str(trained.checkpoint), '--config', str(trained.config), '--out', str(out),
               '--live', '--domain-id', str(DOMAIN_ID), '--no-progress', '--node-timeout',
               '90']
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / 'metrics.json').read_text())
    reference = json.loads((out / 'direct' / 'metrics.json').read_text())
    stream = record['stream']
    assert record['mode'] == 'live' and reference['mode'] == 'direct'
    assert record['trained'] is True and reference['trained'] is True
    assert stream['published'] == 600 and stream['expected_predictions'] == 20
    assert stream['node_exit_code'] == 0
    # One frame a second into an idle node: nothing should be lost, and the pipeline is
    # deterministic, so live equals direct unless DDS lost a frame that mattered (a lost
    # frame moves the node's sampling grid, hence the stamps of its predictions).
    assert stream['predictions'] >= 18, stream
    if stream['missing_predictions'] == 0:
        assert stream['unexpected_predictions'] == 0
        assert stream['same_top1_action_as_direct'] == 1.0
        assert record['metrics'] == reference['metrics']
    else:
        assert overall(record) >= overall(reference) - 2 / 6, stream
    latency = record['latency_ms']
    assert 0 < latency['p50'] <= latency['p95'] and latency['count'] >= 18
    assert record['gap_to_direct']['overall']['action']['top1_accuracy'] == pytest.approx(
        overall(record) - overall(reference))
    assert record['arrival_metrics']['overall']['action']['count'] == 6
    assert (out / 'report' / 'latency_hist.png').read_bytes()[:4] == b'\x89PNG'
    assert (out / 'node.log').is_file() and (out / 'node_params.yaml').is_file()
    assert 'ERROR' not in done.stderr
