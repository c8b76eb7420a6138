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

from malmm_ros.config import parse_yaml
from malmm_ros.errors import ConfigError, MalmmError
from malmm_ros.training.anticipation import run_anticipation
from malmm_ros.training.caption import run_caption
from malmm_ros.training.config import TrainConfig, load_train_config
from malmm_ros.training.loop import TrainResult

__all__ = ['main', 'run']


def run(config: TrainConfig, *, resume: bool = False, progress: bool = True,
        stop_after: int | None = None) -> TrainResult:
    """Train the task `config` names (anticipation or caption). Returns its TrainResult."""
    task = run_caption if config.task == 'caption' else run_anticipation
    return task(config, resume=resume, progress=progress, stop_after=stop_after)


def _parse_set(items: list[str]) -> dict[str, Any]:
    """--set key=value pairs; values read as in the YAML files (1e-4 is a float)."""
    out = {}
    for item in items:
        key, sep, text = item.partition('=')
        if not sep or not key:
            raise ConfigError(f'--set expects key=value, got {item!r}')
        out[key.strip()] = parse_yaml(text, f'--set {item}')
    return out


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
    try:
        overrides = _parse_set(args.set)
        if args.task:
            overrides['task'] = args.task
        # The default config file is optional (defaults apply); a named one must exist.
        path = args.config if Path(args.config).exists() or \
            args.config != 'config/train.yaml' else None
        result = run(load_train_config(path, overrides), resume=args.resume,
                     progress=not args.no_progress, stop_after=args.epochs_this_run)
    except MalmmError as exc:
        print(f'malmm-train: error: {exc}', file=sys.stderr)
        return 2
    if result.checkpoint is not None:
        print(f'checkpoint: {result.checkpoint}')
        if result.history:
            print(json.dumps(result.history[-1], indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
