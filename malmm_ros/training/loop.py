"""The training loop: observed windows streamed through the memory, cross-entropy on the heads.

One function, `train`, used by malmm-train (EK-100 features) and by bench/memory_ablation.py
(synthetic streams), so both exercise the same code. Under torchrun it runs data-parallel
(DistributedDataParallel over whole windows; each rank streams its own batches).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from malmm_ros.model.checkpoint import save_checkpoint
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.training.config import TrainConfig
from malmm_ros.training.state import load_training_state, save_training_state
from malmm_ros.training.streaming import WindowModel
from malmm_ros.training.windows import IGNORE, WindowSource, class_weights, plan_batches

__all__ = ['TrainResult', 'predict_windows', 'train', 'warmup_cosine']

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


def _distributed() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) otherwise."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    return int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0')), world


def _device(choice: str, local_rank: int) -> torch.device:
    if choice == 'cuda' or (choice == 'auto' and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError('device cuda requested but CUDA is not available')
        return torch.device('cuda', local_rank)
    return torch.device('cpu')


def _losses(logits, batch, weights: dict[str, torch.Tensor | None], config: TrainConfig
            ) -> tuple[torch.Tensor, dict[str, float]]:
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
        raise ValueError('a batch has no target for any head')
    return total, parts


def predict_windows(model: WindowModel, source: WindowSource, *, batch_size: int = 32,
                    device: torch.device | str = 'cpu', progress: bool = False
                    ) -> dict[str, np.ndarray]:
    """Softmax scores of every window in `source` order: verb [W, V], noun [W, N] and, if the
    model has an action head, action [W, A]. Runs with autograd off (cached projections, the
    node's arithmetic)."""
    model.eval()
    out: dict[str, np.ndarray] = {}
    batches = plan_batches(source, batch_size, shuffle=False)
    with torch.inference_mode():
        for index in tqdm(batches, desc='predict', unit='batch', disable=not progress):
            batch = source.batch(index)
            logits = model(batch.tokens.to(device), batch.times_s)
            for head in ('verb', 'noun', 'action'):
                scores = getattr(logits, head)
                if scores is None:
                    continue
                if head not in out:
                    out[head] = np.zeros((len(source), scores.shape[1]), dtype=np.float32)
                out[head][index] = scores.float().softmax(-1).cpu().numpy()
    return out


def _quick_metrics(scores: dict[str, np.ndarray], source: WindowSource) -> dict[str, float]:
    """Top-1/top-5 accuracy and class-mean top-5 recall per head over windows with a target."""
    from malmm_ros import metrics

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
    rank, local_rank, world = _distributed()
    if world > 1 and not torch.distributed.is_initialized():
        backend = 'nccl' if config.device != 'cpu' and torch.cuda.is_available() else 'gloo'
        torch.distributed.init_process_group(backend)
    device = _device(config.device, local_rank)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    out_dir = Path(config.out_dir)
    if rank == 0 and save:
        out_dir.mkdir(parents=True, exist_ok=True)
    if len(windows) == 0:
        raise ValueError('no training windows')

    model.to(device).train()
    memory = config.memory
    runner = WindowModel(model, capacity, policy=memory.policy,
                         query_memory=memory.query_memory,
                         current_frame_only=memory.current_frame_only)
    wrapped: nn.Module = runner
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            runner, device_ids=[device.index] if device.type == 'cuda' else None)

    optim_cfg = config.optim
    optimizer = torch.optim.AdamW(_param_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr,
                                  betas=(0.9, 0.999))
    per_epoch = len(plan_batches(windows, optim_cfg.batch_size, shuffle=True, seed=0,
                                 rank=rank, world=world))
    if per_epoch == 0:
        raise ValueError(f'{len(windows)} windows make no batch for {world} rank(s)')
    steps_per_epoch = math.ceil(per_epoch / optim_cfg.grad_accum)
    total_steps = steps_per_epoch * optim_cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, optim_cfg.warmup_steps, optim_cfg.min_lr_ratio))
    weights: dict[str, torch.Tensor | None] = {}
    if optim_cfg.class_balanced:
        labels = model.labels
        weights = {
            'verb': class_weights(windows.verbs, labels.num_verbs).to(device),
            'noun': class_weights(windows.nouns, labels.num_nouns).to(device),
            'action': (class_weights(windows.actions, labels.num_actions).to(device)
                       if labels.num_actions else None),
        }

    start_epoch, step, history = 0, 0, []
    best_score, best_path = -math.inf, None
    state_path = out_dir / STATE_NAME
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f'--resume: no training state at {state_path}')
        info = load_training_state(state_path, model=model, optimizer=optimizer,
                                   scheduler=scheduler)
        start_epoch, step = int(info['epoch']) + 1, int(info['step'])
        history = list(info.get('history', []))
        best_score = float(info.get('best_score', -math.inf))
        best_path = out_dir / BEST_NAME if (out_dir / BEST_NAME).is_file() else None
        _log.info('resumed from %s after epoch %d', state_path, start_epoch)

    amp = optim_cfg.amp and device.type == 'cuda'
    last_path = None
    end_epoch = optim_cfg.epochs if stop_after is None else min(optim_cfg.epochs,
                                                                  start_epoch + stop_after)
    for epoch in range(start_epoch, end_epoch):
        model.train()
        batches = plan_batches(windows, optim_cfg.batch_size, shuffle=True,
                               seed=config.seed * 100003 + epoch, rank=rank, world=world)
        sums: dict[str, float] = {}
        seen = correct = 0
        began = time.perf_counter()
        bar = tqdm(batches, desc=f'epoch {epoch + 1}/{optim_cfg.epochs}', unit='batch',
                   disable=not progress or rank != 0)
        optimizer.zero_grad(set_to_none=True)
        for i, index in enumerate(bar):
            batch = windows.batch(index)
            last_in_step = (i + 1) % optim_cfg.grad_accum == 0 or i + 1 == len(batches)
            sync = contextlib.nullcontext() if last_in_step or world == 1 else wrapped.no_sync()
            autocast = (torch.autocast('cuda', dtype=torch.bfloat16) if amp
                        else contextlib.nullcontext())
            with sync:
                with autocast:
                    logits = wrapped(batch.tokens.to(device, non_blocking=True), batch.times_s)
                loss, parts = _losses(logits, batch, weights, config)
                (loss / optim_cfg.grad_accum).backward()
            if last_in_step:
                if optim_cfg.max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
            n = len(index)
            for key, value in {'loss': float(loss.detach()), **parts}.items():
                sums[key] = sums.get(key, 0.0) + value * n
            target = batch.action if logits.action is not None else batch.verb
            scores = logits.action if logits.action is not None else logits.verb
            valid = target >= 0
            correct += int((scores.argmax(-1).cpu()[valid] == target[valid]).sum())
            seen += n
            bar.set_postfix(loss=f'{sums["loss"] / seen:.3f}',
                            lr=f'{scheduler.get_last_lr()[0]:.2e}')
        record: dict[str, Any] = {
            'epoch': epoch + 1, 'step': step, 'seconds': round(time.perf_counter() - began, 2),
            'lr': scheduler.get_last_lr()[0],
            **{f'train_{k}': v / max(seen, 1) for k, v in sums.items()},
            'train_top1': correct / max(seen, 1),
        }
        if val_windows is not None and len(val_windows) and rank == 0 and (
                (epoch + 1) % config.eval_every == 0 or epoch + 1 == optim_cfg.epochs):
            scores = predict_windows(runner, val_windows, batch_size=optim_cfg.batch_size,
                                     device=device)
            record.update({f'val_{k}': v for k, v in _quick_metrics(scores, val_windows).items()})
        history.append(record)
        if rank == 0:
            _log.info('epoch %d: %s', epoch + 1, json.dumps(record))
            if save:
                score = record.get('val_action_mean_top5_recall',
                                   record.get('val_verb_mean_top5_recall',
                                              -record['train_loss']))
                info = {'config': config.to_dict(), 'epoch': epoch + 1, 'step': step,
                        'history': history, **(training_info or {})}
                last_path = save_checkpoint(out_dir / CHECKPOINT_NAME, model, training=info)
                if score > best_score:
                    best_score = score
                    best_path = save_checkpoint(out_dir / BEST_NAME, model, training=info)
                save_training_state(state_path, model=model, optimizer=optimizer,
                                    scheduler=scheduler,
                                    info={'epoch': epoch, 'step': step, 'history': history,
                                          'best_score': best_score})
                (out_dir / METRICS_NAME).write_text(json.dumps(history, indent=2) + '\n')
    if world > 1:
        torch.distributed.barrier()
    model.eval()
    return TrainResult(checkpoint=last_path, best_checkpoint=best_path, history=history,
                       model=model)
