"""The anticipation task: observed windows streamed through the memory, cross-entropy on the heads.

`train` is used by malmm-train (EK-100 features, set up by `run_anticipation`) and by
bench/memory_ablation.py (synthetic streams), so both exercise the same code. Under torchrun it
runs data-parallel (DistributedDataParallel over whole windows; each rank streams its own
batches; rank 0 validates and writes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from malmm_ros import metrics
from malmm_ros.data.epic import action_vocabulary, load_segments, samples_from_segments
from malmm_ros.data.features import FeatureStore
from malmm_ros.errors import ConfigError, DataError
from malmm_ros.labels import LabelMaps, load_ek100_labels
from malmm_ros.model.checkpoint import save_checkpoint
from malmm_ros.model.heads import HeadLogits
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.model.memory import MemorySpec
from malmm_ros.protocol import Protocol
from malmm_ros.training.config import TrainConfig
from malmm_ros.training.loop import Learner, TrainResult, epoch_seed, prepare_run, run_epochs
from malmm_ros.training.streaming import WindowModel, predict_windows
from malmm_ros.training.windows import (
    IGNORE,
    FeatureWindows,
    WindowBatch,
    WindowSource,
    class_weights,
    plan_batches,
)

__all__ = ['build_labels', 'run_anticipation', 'train']

_log = logging.getLogger(__name__)


def run_anticipation(config: TrainConfig, *, resume: bool = False, progress: bool = True,
                     stop_after: int | None = None) -> TrainResult:
    """Labels, windows and the model from `config` (features, annotations, the node's config),
    then `train`."""
    node = prepare_run(config)
    data = config.data
    base = LabelMaps.placeholder()
    train_segments = load_segments(data.train_annotations, num_verbs=base.num_verbs,
                                   num_nouns=base.num_nouns)
    val_segments = (load_segments(data.val_annotations, num_verbs=base.num_verbs,
                                  num_nouns=base.num_nouns) if data.val_annotations else [])
    labels = build_labels(config, train_segments, val_segments)
    if node.sample_fps <= 0:
        raise ConfigError(f'{config.anticipate_config}: sample_fps is 0 (every frame); '
                          'training needs the rate the node samples at')
    store = FeatureStore(data.features_dir)
    windows = _windows(config, store, train_segments, labels, node.sample_fps, 'training')
    val_windows = (_windows(config, store, val_segments, labels, node.sample_fps, 'validation')
                   if val_segments else None)
    model = MalmmModel(node.model, labels)
    capacity = config.memory.capacity or node.memory_bank_length
    protocol = Protocol(tau_a=data.tau_a, tau_o=data.tau_o, sample_fps=node.sample_fps,
                        memory_bank_length=capacity, max_feature_lag_s=data.max_feature_lag_s)
    info = {
        'task': 'anticipation', **protocol.to_dict(), 'memory_policy': config.memory.policy,
        'train_annotations': Path(data.train_annotations).name,
        'train_windows': windows.summary(),
    }
    return train(config, model, windows, capacity=capacity, val_windows=val_windows,
                 training_info=info, resume=resume, progress=progress, stop_after=stop_after)


def build_labels(config: TrainConfig, train_segments, val_segments) -> LabelMaps:
    """Class names from the annotations folder, actions from the training (+ validation) pairs."""
    labels = (load_ek100_labels(config.data.annotations_dir) if config.data.annotations_dir
              else LabelMaps.placeholder())
    lists = [train_segments]
    if config.data.actions_from_validation and val_segments:
        lists.append(val_segments)
    return labels.with_actions(action_vocabulary(*lists))


def _windows(config: TrainConfig, store, segments, labels: LabelMaps, fps: float, split: str
             ) -> FeatureWindows:
    data = config.data
    windows = FeatureWindows(store, samples_from_segments(segments, data.tau_a, data.tau_o),
                             labels, sample_fps=fps, max_lag_s=data.max_feature_lag_s)
    _log.info('%s windows: %s', split, json.dumps(windows.summary()))
    return windows


def train(config: TrainConfig, model: MalmmModel, windows: WindowSource, *,
          capacity: int, val_windows: WindowSource | None = None,
          training_info: dict[str, Any] | None = None, resume: bool = False,
          progress: bool = True, save: bool = True,
          stop_after: int | None = None) -> TrainResult:
    """Train `model` in place on `windows`; checkpoints and metrics go to config.out_dir.

    `capacity` is the memory length M the node will run with. `training_info` is stored in
    the checkpoint (protocol, sample_fps, sources). With `resume`, the training state in
    out_dir is restored and training continues at the next epoch.
    """
    rank, world, device = _start_distributed(config.device)
    if len(windows) == 0:
        raise DataError('no training windows')
    model.to(device).train()
    memory = config.memory
    runner = WindowModel(model, MemorySpec(capacity, policy=memory.policy,
                                           query_memory=memory.query_memory),
                         current_frame_only=memory.current_frame_only)
    optim = config.optim
    per_epoch = len(plan_batches(windows, optim.batch_size, shuffle=True, seed=0,
                                 rank=rank, world=world))
    if per_epoch == 0:
        raise DataError(f'{len(windows)} windows make no batch for {world} rank(s)')
    learner = Learner.adamw(model, _param_groups(model, optim.weight_decay), optim,
                            math.ceil(per_epoch / optim.grad_accum))
    task = _Anticipation(config, learner, runner, windows, val_windows, device=device,
                         rank=rank, world=world, progress=progress)
    result = run_epochs(task, config, info=training_info or {}, resume=resume,
                        stop_after=stop_after, save=save, rank=rank)
    if world > 1:
        torch.distributed.barrier()
    model.eval()
    result.model = model
    return result


def _start_distributed(choice: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; (0, 1, ...) otherwise."""
    rank, local_rank = int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0'))
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world > 1 and not torch.distributed.is_initialized():
        backend = 'nccl' if choice != 'cpu' and torch.cuda.is_available() else 'gloo'
        torch.distributed.init_process_group(backend)
    device = torch.device('cpu')
    if choice == 'cuda' or (choice == 'auto' and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError('device cuda requested but CUDA is not available')
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
    return rank, world, device


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on biases, norms, time-bias tables and learned embeddings (the usual choice)."""
    decay, plain = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or 'norm' in name or 'time_bias' in name or \
            name.endswith(('query_tokens', 'position'))
        (plain if skip else decay).append(param)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': plain, 'weight_decay': 0.0}]


class _Anticipation:
    """The anticipation task on the run skeleton (loop.run_epochs)."""

    def __init__(self, config: TrainConfig, learner: Learner, runner: WindowModel,
                 windows: WindowSource, val_windows: WindowSource | None, *,
                 device: torch.device, rank: int, world: int, progress: bool) -> None:
        self.config, self.learner, self.runner = config, learner, runner
        self.windows, self.val_windows = windows, val_windows
        self.device, self.rank, self.world, self.progress = device, rank, world, progress
        self.wrapped: nn.Module = runner
        if world > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(
                runner, device_ids=[device.index] if device.type == 'cuda' else None)
        self.weights: dict[str, torch.Tensor | None] = {}
        if config.optim.class_balanced:
            labels = runner.model.labels
            self.weights = {
                'verb': class_weights(windows.verbs, labels.num_verbs).to(device),
                'noun': class_weights(windows.nouns, labels.num_nouns).to(device),
                'action': (class_weights(windows.actions, labels.num_actions).to(device)
                           if labels.num_actions else None),
            }
        self.amp = config.optim.amp and device.type == 'cuda'

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        optim = self.config.optim
        self.runner.model.train()
        batches = plan_batches(self.windows, optim.batch_size, shuffle=True,
                               seed=epoch_seed(self.config.seed, epoch), rank=self.rank,
                               world=self.world)
        sums: dict[str, float] = {}
        seen = correct = 0
        began = time.perf_counter()
        bar = tqdm(batches, desc=f'epoch {epoch + 1}/{optim.epochs}', unit='batch',
                   disable=not self.progress or self.rank != 0)
        self.learner.optimizer.zero_grad(set_to_none=True)
        for i, index in enumerate(bar):
            batch = self.windows.batch(index)
            last_in_step = (i + 1) % optim.grad_accum == 0 or i + 1 == len(batches)
            logits, parts = self._backward(batch, sync=last_in_step)
            if last_in_step:
                self.learner.step()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value * len(index)
            correct += _correct(logits, batch)
            seen += len(index)
            bar.set_postfix(loss=f'{sums["loss"] / seen:.3f}', lr=f'{self.learner.lr:.2e}')
        record: dict[str, Any] = {
            'epoch': epoch + 1, 'step': self.learner.steps,
            'seconds': round(time.perf_counter() - began, 2), 'lr': self.learner.lr,
            **{f'train_{k}': v / max(seen, 1) for k, v in sums.items()},
            'train_top1': correct / max(seen, 1),
        }
        val = self.val_windows
        if val is not None and len(val) and self.rank == 0 and (
                (epoch + 1) % self.config.eval_every == 0 or epoch + 1 == optim.epochs):
            scores = predict_windows(self.runner, val, batch_size=optim.batch_size,
                                     device=self.device)
            record.update({f'val_{k}': v for k, v in _quick_metrics(scores, val).items()})
        return record

    def _backward(self, batch: WindowBatch, *, sync: bool) -> tuple[HeadLogits, dict[str, float]]:
        """Forward and backward of one micro-batch; DDP averages gradients only when `sync`."""
        grad_accum = self.config.optim.grad_accum
        no_sync = self.world > 1 and not sync
        with self.wrapped.no_sync() if no_sync else contextlib.nullcontext():
            with (torch.autocast('cuda', dtype=torch.bfloat16) if self.amp
                  else contextlib.nullcontext()):
                logits = self.wrapped(batch.tokens.to(self.device, non_blocking=True),
                                      batch.times_s)
            loss, parts = _losses(logits, batch, self.weights, self.config)
            (loss / grad_accum).backward()
        return logits, {'loss': float(loss.detach()), **parts}

    def save(self, path: Path, training: dict[str, Any]) -> Path:
        return save_checkpoint(path, self.runner.model, training=training)

    def score(self, record: dict[str, Any]) -> float:
        """Validation action mean top-5 recall, else verb's, else the negated training loss."""
        return record.get('val_action_mean_top5_recall',
                          record.get('val_verb_mean_top5_recall', -record['train_loss']))


def _losses(logits: HeadLogits, batch: WindowBatch, weights: dict[str, torch.Tensor | None],
            config: TrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    optim = config.optim
    parts = {}
    total = None
    for head, weight in (('verb', optim.verb_weight), ('noun', optim.noun_weight),
                         ('action', optim.action_weight)):
        scores = getattr(logits, head)
        if scores is None or weight == 0:
            continue
        target = getattr(batch, head).to(scores.device)
        if bool((target == IGNORE).all()):
            continue
        loss = F.cross_entropy(scores.float(), target, weight=weights.get(head),
                               ignore_index=IGNORE, label_smoothing=optim.label_smoothing)
        parts[head] = float(loss.detach())
        total = weight * loss if total is None else total + weight * loss
    if total is None:
        raise DataError('a batch has no target for any head (no verb, noun or action label, '
                        'or every head with one has loss weight 0)')
    return total, parts


def _correct(logits: HeadLogits, batch: WindowBatch) -> int:
    """Top-1 hits on the action head (the verb head when there is none)."""
    target = batch.action if logits.action is not None else batch.verb
    scores = logits.action if logits.action is not None else logits.verb
    valid = target >= 0
    return int((scores.argmax(-1).cpu()[valid] == target[valid]).sum())


def _quick_metrics(scores: dict[str, Any], source: WindowSource) -> dict[str, float]:
    """Top-1/top-5 accuracy and class-mean top-5 recall per head over windows with a target."""
    result = {}
    for head, labels in (('verb', source.verbs), ('noun', source.nouns),
                         ('action', source.actions)):
        if head not in scores:
            continue
        keep = labels >= 0
        if not keep.any():
            continue
        s, y = scores[head][keep], labels[keep]
        result[f'{head}_top1'] = metrics.topk_accuracy(s, y, k=1)
        result[f'{head}_top5'] = metrics.topk_accuracy(s, y, k=5)
        result[f'{head}_mean_top5_recall'] = metrics.mean_topk_recall(s, y, k=5)
    return result
