"""The run skeleton both training tasks share: seeding, optimizer and schedule, resume, epochs,
checkpoints, the training state and metrics.json.

A task (training/anticipation.py, training/caption.py) sets up what learns and trains one epoch;
`run_epochs` does the rest the same way for both, so a run stopped and resumed ends with the
weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from malmm_ros.config import AnticipateConfig, load_config
from malmm_ros.errors import CheckpointError, ConfigError
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.training.config import OptimConfig, TrainConfig
from malmm_ros.training.state import load_training_state, save_training_state

__all__ = ['BEST_NAME', 'CHECKPOINT_NAME', 'METRICS_NAME', 'STATE_NAME', 'Learner', 'Task',
           'TrainResult', 'epoch_seed', 'prepare_run', 'run_epochs', 'warmup_cosine']

_log = logging.getLogger(__name__)
CHECKPOINT_NAME = 'checkpoint.safetensors'
BEST_NAME = 'best.safetensors'
STATE_NAME = 'train_state.safetensors'
METRICS_NAME = 'metrics.json'


@dataclass
class TrainResult:
    checkpoint: Path | None  # the last epoch's checkpoint (rank 0 only)
    best_checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    model: MalmmModel | None = None


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float
                  ) -> Callable[[int], float]:
    """Learning-rate factor: linear from ~0 to 1 over warm-up, cosine down to min_ratio."""
    warmup = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def epoch_seed(seed: int, epoch: int) -> int:
    """Shuffling seed of one epoch, so a resumed run shuffles as an uninterrupted one does."""
    return seed * 100003 + epoch


def prepare_run(config: TrainConfig) -> AnticipateConfig:
    """The node's config (architecture, M, sample_fps), after what every task does first: set
    the CPU threads, check the training annotations are given, seed initialisation."""
    node = load_config(config.anticipate_config)
    torch.set_num_threads(config.num_threads or node.threads())
    if not config.data.train_annotations:
        raise ConfigError('data.train_annotations is not set (EPIC_100_train.csv)')
    torch.manual_seed(config.seed)
    return node


@dataclass
class Learner:
    """What learns: the module the training state holds, AdamW and its warm-up + cosine
    schedule. `step()` is one optimizer step."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    max_grad_norm: float

    @classmethod
    def adamw(cls, module: nn.Module, params: Iterable[Any], optim: OptimConfig,
              steps_per_epoch: int) -> Learner:
        """`params`: the module's parameters or parameter groups (which may set weight_decay)."""
        optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=(0.9, 0.999),
                                      weight_decay=optim.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(steps_per_epoch * optim.epochs, optim.warmup_steps,
                                     optim.min_lr_ratio))
        return cls(module, optimizer, scheduler, optim.max_grad_norm)

    def step(self) -> None:
        """Clip the gradients (max_grad_norm > 0), step, advance the schedule, clear them."""
        if self.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def steps(self) -> int:
        """Optimizer steps so far (the schedule counts them and the training state keeps it)."""
        return self.scheduler.last_epoch

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


class Task(Protocol):
    """A training task on the skeleton: `train_epoch` trains epoch e (0-based) and returns its
    record for metrics.json; `save` writes a checkpoint with the given training section;
    `score` ranks records for best.safetensors (higher is better; None: no best file)."""

    learner: Learner

    def train_epoch(self, epoch: int) -> dict[str, Any]: ...

    def save(self, path: Path, training: dict[str, Any]) -> Path: ...

    def score(self, record: dict[str, Any]) -> float | None: ...


def run_epochs(task: Task, config: TrainConfig, *, info: dict[str, Any], resume: bool = False,
               stop_after: int | None = None, save: bool = True, rank: int = 0
               ) -> TrainResult:
    """Train from the first epoch or, with `resume`, after the one the training state in
    out_dir ends with; at most `stop_after` epochs this time. After each epoch rank 0 writes
    the checkpoint (with `info` in its training section), best.safetensors when the score
    improved, the training state and metrics.json."""
    out_dir = Path(config.out_dir)
    if save and rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f'out_dir {out_dir} cannot be created: {exc.strerror}') from None
    state = _resume(out_dir / STATE_NAME, task.learner) if resume else {}
    history = list(state.get('history', []))
    best_score = float(state.get('best_score', -math.inf))
    best = out_dir / BEST_NAME if resume and (out_dir / BEST_NAME).is_file() else None
    last = None
    start = int(state['epoch']) + 1 if resume else 0
    epochs = config.optim.epochs
    for epoch in range(start, epochs if stop_after is None else min(epochs, start + stop_after)):
        record = task.train_epoch(epoch)
        history.append(record)
        if rank != 0:
            continue
        _log.info('epoch %d: %s', epoch + 1, json.dumps(record))
        if not save:
            continue
        steps = task.learner.steps
        training = {'config': config.to_dict(), 'epoch': epoch + 1, 'step': steps,
                    'history': history, **info}
        last = task.save(out_dir / CHECKPOINT_NAME, training)
        score = task.score(record)
        if score is None:
            best = last
        elif score > best_score:
            best_score = score
            best = task.save(out_dir / BEST_NAME, training)
        kept = {'epoch': epoch, 'step': steps, 'history': history}
        if math.isfinite(best_score):
            kept['best_score'] = best_score
        learner = task.learner
        save_training_state(out_dir / STATE_NAME, model=learner.module,
                            optimizer=learner.optimizer, scheduler=learner.scheduler, info=kept)
        (out_dir / METRICS_NAME).write_text(json.dumps(history, indent=2) + '\n')
    return TrainResult(checkpoint=last, best_checkpoint=best, history=history)


def _resume(path: Path, learner: Learner) -> dict[str, Any]:
    """Weights, optimizer, schedule and RNG from the training state; its info."""
    if not path.is_file():
        raise CheckpointError(f'--resume: no training state at {path}')
    state = load_training_state(path, model=learner.module, optimizer=learner.optimizer,
                                scheduler=learner.scheduler)
    if not isinstance(state.get('epoch'), int):
        raise CheckpointError(f'training state {path}: its info names no epoch')
    _log.info('resumed from %s after epoch %d', path, int(state['epoch']) + 1)
    return state
