"""The training loop on small synthetic windows: learning, resume, checkpoints, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from malmm_ros.config import model_preset
from malmm_ros.errors import CheckpointError, ConfigError
from malmm_ros.labels import LabelMaps
from malmm_ros.model.checkpoint import load_checkpoint, read_checkpoint_metadata
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.model.memory import MemorySpec
from malmm_ros.training.anticipation import train
from malmm_ros.training.config import TrainConfig, load_train_config
from malmm_ros.training.loop import warmup_cosine
from malmm_ros.training.state import load_training_state
from malmm_ros.training.streaming import WindowModel, predict_windows
from malmm_ros.training.windows import IGNORE, InMemoryWindows, class_weights, plan_batches

REPO = Path(__file__).resolve().parents[2]
WIDTH = 32
PAIRS = [(0, 0), (1, 1), (2, 2), (3, 0)]  # verb c goes with noun PAIRS[c][1]


pytestmark = pytest.mark.usefixtures('single_thread')  # test/conftest.py


def labels() -> LabelMaps:
    return LabelMaps.placeholder(4, 3).with_actions(PAIRS)


def small_model(seed: int = 0, feature_dim: int = WIDTH) -> MalmmModel:
    torch.manual_seed(seed)
    arch = model_preset('edge', num_layers=2, hidden_size=32, num_heads=2,
                        intermediate_size=64, num_queries=4, encoder_width=32)
    return MalmmModel(arch, labels(), feature_dim=feature_dim, num_tokens=5)


def cue_windows(count: int, *, cue_at: int, frames: int = 6, seed: int = 0,
                feature_dim: int = WIDTH) -> InMemoryWindows:
    """Noise frames; frame `cue_at` carries class c's pattern; label verb c."""
    rng = np.random.default_rng(seed)
    protos = np.random.default_rng(99).normal(size=(4, 5, feature_dim)).astype(np.float32)
    tokens, times, verbs, nouns = [], [], [], []
    for i in range(count):
        c = i % 4
        x = rng.normal(size=(frames, 5, feature_dim)).astype(np.float32)
        x[cue_at] += 2.0 * protos[c]
        tokens.append(x)
        times.append(np.arange(frames, dtype=np.float64) + 100.0 * i)  # absolute times vary
        verbs.append(c)
        nouns.append(PAIRS[c][1])
    return InMemoryWindows(tokens, times, verbs, nouns, labels())


def config(tmp_path: Path, **changes) -> TrainConfig:
    base = {'out_dir': str(tmp_path / 'run'), 'device': 'cpu', 'optim.epochs': 4,
            'optim.batch_size': 8, 'optim.lr': 3e-3, 'optim.warmup_steps': 2}
    return TrainConfig.from_dict({**base, **changes})


@pytest.mark.slow  # trains until the cue is learnt
def test_learns_a_cue_in_the_newest_frame(tmp_path: Path) -> None:
    windows = cue_windows(48, cue_at=5)
    result = train(config(tmp_path, **{'optim.epochs': 12}), small_model(), windows,
                   capacity=3, val_windows=cue_windows(16, cue_at=5, seed=1), progress=False)
    first, last = result.history[0], result.history[-1]
    assert last['train_loss'] < 0.6 * first['train_loss']
    assert last['train_top1'] >= 0.9
    assert last['val_verb_top1'] >= 0.9  # held-out windows
    assert last['val_action_top5'] == 1.0  # 4 actions: all are in the top 5
    history = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert [h['epoch'] for h in history] == list(range(1, 13))


def test_checkpoint_carries_labels_protocol_and_loads(tmp_path: Path) -> None:
    model = small_model()
    result = train(config(tmp_path, **{'optim.epochs': 1}), model, cue_windows(16, cue_at=5),
                   capacity=3, training_info={'tau_a': 1.0, 'sample_fps': 1.0},
                   progress=False)
    meta = read_checkpoint_metadata(result.checkpoint)
    assert meta['training']['tau_a'] == 1.0
    assert meta['training']['config']['optim']['epochs'] == 1
    assert [(a['verb_id'], a['noun_id']) for a in meta['labels']['actions']] == PAIRS
    loaded = load_checkpoint(result.checkpoint)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value.cpu(), rtol=0, atol=0)


def test_resume_continues_exactly(tmp_path: Path) -> None:
    windows = cue_windows(24, cue_at=2)
    straight = train(config(tmp_path / 'a'), small_model(), windows, capacity=3,
                     progress=False)
    split = config(tmp_path / 'b')
    stopped = train(split, small_model(), windows, capacity=3, progress=False, stop_after=2)
    assert [h['epoch'] for h in stopped.history] == [1, 2]
    # A different initialisation proves the weights come from the saved state.
    resumed = train(split, small_model(seed=7), windows, capacity=3, resume=True,
                    progress=False)
    assert [h['epoch'] for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.history[-1]['step'] == straight.history[-1]['step']
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def test_training_state_is_safetensors_and_bad_state_is_refused(tmp_path: Path) -> None:
    cfg = config(tmp_path, **{'optim.epochs': 1})
    train(cfg, small_model(), cue_windows(8, cue_at=5), capacity=3, progress=False)
    state = tmp_path / 'run' / 'train_state.safetensors'
    with safe_open(str(state), framework='pt') as handle:
        names = set(handle.keys())
    assert 'rng.torch' in names and any(n.startswith('optim.') for n in names)
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state.write_bytes(b'\x80\x04not a safetensors file')
    with pytest.raises(CheckpointError, match='train_state.safetensors'):
        load_training_state(state, model=model, optimizer=optimizer, scheduler=scheduler)
    with pytest.raises(CheckpointError, match='no training state'):
        train(config(tmp_path / 'empty'), small_model(), cue_windows(8, cue_at=5),
              capacity=3, resume=True, progress=False)


def test_inference_scores_equal_the_training_forward(tmp_path: Path) -> None:
    model = small_model(seed=3).eval()
    windows = cue_windows(8, cue_at=1, frames=9)
    runner = WindowModel(model, MemorySpec(3))
    fast = predict_windows(runner, windows, batch_size=4)  # cached projections
    batch = windows.batch(range(8))
    with torch.enable_grad():
        slow = runner(batch.tokens, batch.times_s)  # recomputed from the banks
    np.testing.assert_allclose(fast['verb'], slow.verb.softmax(-1).detach().numpy(),
                               rtol=0, atol=2e-6)
    # Streaming one window alone equals its row in the batch.
    alone = runner(batch.tokens[2:3], batch.times_s).verb.softmax(-1).detach().numpy()
    np.testing.assert_allclose(alone[0], fast['verb'][2], rtol=0, atol=2e-6)


@pytest.mark.parametrize(('policy', 'query_memory', 'current_only'),
                         [('fifo', True, False), ('mbc', False, False), ('mbc', True, True)])
def test_memory_variants_change_the_result(policy: str, query_memory: bool,
                                           current_only: bool) -> None:
    model = small_model(seed=4).eval()
    windows = cue_windows(4, cue_at=1, frames=9)
    base = predict_windows(WindowModel(model, MemorySpec(3)), windows)['verb']
    spec = MemorySpec(3, policy=policy, query_memory=query_memory)
    variant = predict_windows(WindowModel(model, spec, current_frame_only=current_only),
                              windows)['verb']
    assert not np.allclose(base, variant, atol=1e-4)


def test_plan_batches_groups_patterns_and_splits_ranks() -> None:
    rng = np.random.default_rng(0)
    tokens = [rng.normal(size=(n, 5, WIDTH)) for n in (3, 3, 2, 3, 2, 3, 3)]
    times = [np.arange(len(t)) * 1.0 for t in tokens]
    windows = InMemoryWindows(tokens, times, [0] * 7, [0] * 7, labels())
    batches = plan_batches(windows, 2, shuffle=True, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len({windows.patterns[i] for i in b}) == 1 for b in batches)
    shares = [plan_batches(windows, 2, shuffle=True, seed=1, rank=r, world=2) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 2
    assert not set(map(tuple, shares[0])) & set(map(tuple, shares[1]))
    with pytest.raises(ValueError, match='one time pattern'):
        windows.batch([0, 2])


def test_action_targets_and_class_weights() -> None:
    windows = InMemoryWindows([np.zeros((1, 5, WIDTH))] * 3, [[0.0]] * 3, [0, 1, 3],
                              [0, 2, 0], labels())
    assert windows.actions.tolist() == [0, IGNORE, 3]  # (1, 2) is not in the vocabulary
    weights = class_weights(np.array([0, 0, 0, 0, 1, IGNORE]), 3)
    assert weights[1] / weights[0] == pytest.approx(2.0)  # 1/sqrt(1) vs 1/sqrt(4)
    assert (4 * weights[0] + weights[1]) / 5 == pytest.approx(1.0)


def test_warmup_cosine_schedule() -> None:
    f = warmup_cosine(100, 10, 0.1)
    assert f(0) == pytest.approx(1 / 11)
    assert f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_train_config_file_and_errors(tmp_path: Path) -> None:
    cfg = load_train_config(REPO / 'config' / 'train.yaml')
    assert cfg.data.tau_a == 1.0 and cfg.memory.policy == 'mbc'
    with pytest.raises(ConfigError, match=r'optim.lr must be in'):
        load_train_config(None, {'optim.lr': 2.0})
    with pytest.raises(ConfigError, match='unknown setting.*optim.rate'):
        load_train_config(None, {'optim.rate': 0.1})
    with pytest.raises(ConfigError, match='memory.policy must be one of'):
        load_train_config(None, {'memory.policy': 'lru'})
    bad = tmp_path / 'bad.yaml'
    bad.write_text('optim: [1, 2\n')
    with pytest.raises(ConfigError, match='bad.yaml: not valid YAML'):
        load_train_config(bad)


DDP_SCRIPT = textwrap.dedent('''
    import os, sys
    import torch
    sys.path.insert(0, {test_dir!r})
    from test_train_loop import cue_windows, small_model, config
    from pathlib import Path
    from safetensors.torch import save_file
    from malmm_ros.training.anticipation import train
    torch.set_num_threads(1)
    out = Path({out!r})
    cfg = config(out, **{{'optim.epochs': 2}})
    result = train(cfg, small_model(), cue_windows(32, cue_at=5), capacity=3, progress=False)
    rank = int(os.environ['RANK'])
    save_file({{k: v.contiguous() for k, v in result.model.state_dict().items()}},
              str(out / f'rank{{rank}}.safetensors'))
    torch.distributed.destroy_process_group()
''')


@pytest.mark.slow  # torchrun with two processes
def test_torchrun_ddp_keeps_ranks_identical(tmp_path: Path) -> None:
    script = tmp_path / 'ddp_train.py'
    script.write_text(DDP_SCRIPT.format(test_dir=str(Path(__file__).parent), out=str(tmp_path)))
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MASTER_ADDR': '127.0.0.1',
           'PYTHONPATH': str(REPO)}
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2',
         str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with safe_open(str(tmp_path / 'rank0.safetensors'), framework='pt') as a, \
            safe_open(str(tmp_path / 'rank1.safetensors'), framework='pt') as b:
        for name in a.keys():  # noqa: SIM118
            torch.testing.assert_close(a.get_tensor(name), b.get_tensor(name), rtol=0, atol=0)
    history = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
    assert len(history) == 2  # rank 0 wrote it; 32 windows / 8 per batch / 2 ranks = 2 steps
    assert history[-1]['step'] == 4
