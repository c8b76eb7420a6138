"""Resumable training state without pickle: safetensors for tensors, JSON for the rest.

torch.save/torch.load of an optimizer would unpickle on resume; here every tensor of the
model, the optimizer state and the RNG goes into a safetensors file and every plain value into
its JSON header, so resuming reads data only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from malmm_ros.errors import CheckpointError

__all__ = ['STATE_FORMAT', 'load_training_state', 'save_training_state']

STATE_FORMAT = 'malmm_ros/train_state/v1'
_KEY = 'malmm_ros'


def save_training_state(path: str | os.PathLike, *, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, scheduler: Any,
                        info: dict[str, Any]) -> Path:
    """Write model, optimizer, scheduler, RNG and `info` (epoch, step, ...) atomically."""
    path = Path(path)
    tensors = {f'model.{k}': v.detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in optim['state'].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f'optim.{index}.{key}'] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors['rng.torch'] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors['rng.cuda'] = torch.cuda.get_rng_state()
    header = {
        'format': STATE_FORMAT,
        'info': info,
        'param_groups': optim['param_groups'],
        'optimizer_scalars': scalars,
        'scheduler': {k: v for k, v in scheduler.state_dict().items() if k != 'lr_lambdas'},
    }
    tmp = path.with_name(path.name + '.tmp')
    save_file(tensors, str(tmp), metadata={_KEY: json.dumps(header)})
    os.replace(tmp, path)
    return path


def load_training_state(path: str | os.PathLike, *, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore what save_training_state wrote; returns its `info`. Errors name the file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework='pt', device='cpu') as handle:
            header = json.loads((handle.metadata() or {}).get(_KEY, 'null'))
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f'training state {path} is not readable: {exc}') from None
    if not isinstance(header, dict) or header.get('format') != STATE_FORMAT:
        raise CheckpointError(f'training state {path}: not a {STATE_FORMAT} file')
    weights = {k[len('model.'):]: v for k, v in tensors.items() if k.startswith('model.')}
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f'training state {path} does not fit the model: {exc}') from None
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith('optim.'):
            _, index, key = name.split('.', 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in header.get('optimizer_scalars', {}).items():
        state.setdefault(int(index), {}).update(values)
    try:
        optimizer.load_state_dict({'state': state, 'param_groups': header['param_groups']})
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f'training state {path}: optimizer state does not fit: {exc}'
                              ) from None
    scheduler.load_state_dict({**scheduler.state_dict(), **header.get('scheduler', {})})
    torch.set_rng_state(tensors['rng.torch'])
    if 'rng.cuda' in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors['rng.cuda'])
    return header.get('info', {})
