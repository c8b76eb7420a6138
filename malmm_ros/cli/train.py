"""malmm-train: train the edge model's Q-Former and heads on precomputed EK-100 features.

    malmm-train --config config/train.yaml [--set optim.lr=1e-4 ...] [--resume]
    torchrun --nproc-per-node 4 -m malmm_ros.cli.train --config config/train.yaml

The encoder is frozen (features from malmm-extract); each observed window streams through the
memory exactly as the node's will (same M, same compression, same sampling).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from malmm_ros.config import load_config
from malmm_ros.data.labels import LabelMaps, load_ek100_labels
from malmm_ros.errors import MalmmError
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.training.config import TrainConfig, load_train_config

__all__ = ['build_labels', 'main', 'run']

_log = logging.getLogger('malmm_ros.train')


def _parse_set(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, text = item.partition('=')
        if not sep or not key:
            raise SystemExit(f'--set expects key=value, got {item!r}')
        out[key.strip()] = yaml.safe_load(text)
    return out


def build_labels(config: TrainConfig, train_segments, val_segments) -> LabelMaps:
    """Class names from the annotations folder, actions from the training (+ validation) pairs."""
    from malmm_ros.data.epic import action_vocabulary

    labels = (load_ek100_labels(config.data.annotations_dir) if config.data.annotations_dir
              else LabelMaps.placeholder())
    lists = [train_segments]
    if config.data.actions_from_validation and val_segments:
        lists.append(val_segments)
    pairs = action_vocabulary(*lists)
    return labels.with_actions(pairs)


def run(config: TrainConfig, *, resume: bool = False, progress: bool = True,
        stop_after: int | None = None):
    """Build labels, windows and the model from `config`, then train. Returns TrainResult."""
    from malmm_ros.data.epic import load_segments, samples_from_segments
    from malmm_ros.data.features import FeatureStore
    from malmm_ros.training.loop import train
    from malmm_ros.training.windows import FeatureWindows

    if config.task != 'anticipation':
        from malmm_ros.training.caption import run_caption

        return run_caption(config, resume=resume, progress=progress, stop_after=stop_after)
    node = load_config(config.anticipate_config)
    torch.set_num_threads(config.num_threads or node.threads())
    data = config.data
    if not data.train_annotations:
        raise MalmmError('data.train_annotations is not set (EPIC_100_train.csv)')
    base = LabelMaps.placeholder()
    train_segments = load_segments(data.train_annotations, num_verbs=base.num_verbs,
                                   num_nouns=base.num_nouns)
    val_segments = (load_segments(data.val_annotations, num_verbs=base.num_verbs,
                                  num_nouns=base.num_nouns) if data.val_annotations else [])
    labels = build_labels(config, train_segments, val_segments)
    store = FeatureStore(data.features_dir)
    fps = node.sample_fps
    if fps <= 0:
        raise MalmmError(f'{config.anticipate_config}: sample_fps is 0 (every frame); training '
                         'needs the rate the node samples at')
    windows = FeatureWindows(store, samples_from_segments(train_segments, data.tau_a,
                                                          data.tau_o),
                             labels, sample_fps=fps, max_lag_s=data.max_feature_lag_s)
    _log.info('training windows: %s', json.dumps(windows.summary()))
    val_windows = None
    if val_segments:
        val_windows = FeatureWindows(store, samples_from_segments(val_segments, data.tau_a,
                                                                  data.tau_o),
                                     labels, sample_fps=fps, max_lag_s=data.max_feature_lag_s)
        _log.info('validation windows: %s', json.dumps(val_windows.summary()))
    torch.manual_seed(config.seed)
    model = MalmmModel(node.model, labels)
    capacity = config.memory.capacity or node.memory_bank_length
    info = {
        'task': 'anticipation',
        'tau_a': data.tau_a, 'tau_o': data.tau_o, 'sample_fps': fps,
        'memory_bank_length': capacity, 'memory_policy': config.memory.policy,
        'train_annotations': Path(data.train_annotations).name,
        'train_windows': windows.summary(),
    }
    return train(config, model, windows, capacity=capacity, val_windows=val_windows,
                 training_info=info, resume=resume, progress=progress, stop_after=stop_after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='malmm-train', description=__doc__.split('\n')[0])
    parser.add_argument('--config', default='config/train.yaml', help='training config YAML')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='override a setting, e.g. optim.epochs=3 (repeatable)')
    parser.add_argument('--task', choices=('anticipation', 'caption'),
                        help='what to train (overrides the config)')
    parser.add_argument('--resume', action='store_true',
                        help='continue from out_dir/train_state.safetensors')
    parser.add_argument('--epochs-this-run', type=int, metavar='N',
                        help='stop after N epochs (time-limited jobs; continue with --resume)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    overrides = _parse_set(args.set)
    if args.task:
        overrides['task'] = args.task
    try:
        config = load_train_config(args.config if Path(args.config).exists() or
                                   args.config != 'config/train.yaml' else None, overrides)
        result = run(config, resume=args.resume, progress=not args.no_progress,
                     stop_after=args.epochs_this_run)
    except (MalmmError, FileNotFoundError, ValueError) as exc:
        print(f'malmm-train: error: {exc}', file=sys.stderr)
        return 2
    if result.checkpoint is not None:
        print(f'checkpoint: {result.checkpoint}')
        if result.history:
            print(json.dumps(result.history[-1], indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
