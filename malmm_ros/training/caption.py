"""`malmm-train --task caption`: teach the text projector to say what happens next.

The anticipation checkpoint's model and the LLM are frozen; only the projector learns (as in
MA-LMM, where the LLM is frozen). Each observed window streams through the frozen memory once,
exactly as at run time, and its last query outputs are kept; the target text is the narration
of the segment that starts ta seconds after the window ends ("describe what happens next").
Because nothing before the projector learns, the queries are computed once and reused every
epoch, which makes this fast even on a CPU.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from malmm_ros.config import load_config
from malmm_ros.errors import ConfigError, MalmmError
from malmm_ros.model.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from malmm_ros.training.config import TrainConfig
from malmm_ros.training.loop import CHECKPOINT_NAME, METRICS_NAME, STATE_NAME, warmup_cosine
from malmm_ros.training.state import load_training_state, save_training_state
from malmm_ros.training.streaming import WindowModel
from malmm_ros.training.windows import WindowSource, plan_batches

__all__ = ['run_caption', 'window_queries']

_log = logging.getLogger(__name__)


def window_queries(runner: WindowModel, source: WindowSource, *, batch_size: int = 32,
                   progress: bool = False) -> torch.Tensor:
    """The last step's query outputs of every window, [W, Q, D] (autograd off, cached banks)."""
    runner.eval()
    model = runner.model
    out = torch.zeros(len(source), model.config.num_queries, model.config.hidden_size)
    with torch.inference_mode():
        for index in tqdm(plan_batches(source, batch_size, shuffle=False), desc='queries',
                          unit='batch', disable=not progress):
            batch = source.batch(index)
            out[index] = runner.queries(batch.tokens, batch.times_s).float().cpu()
    return out


def run_caption(config: TrainConfig, *, resume: bool = False, progress: bool = True,
                stop_after: int | None = None):
    """Train the projector; writes out_dir/checkpoint.safetensors (model + projector)."""
    from malmm_ros.data.epic import load_segments, samples_from_segments
    from malmm_ros.data.features import FeatureStore
    from malmm_ros.model.text import GenerationOptions, TextDescriber
    from malmm_ros.training.loop import TrainResult
    from malmm_ros.training.windows import FeatureWindows

    node = load_config(config.anticipate_config)
    torch.set_num_threads(config.num_threads or node.threads())
    caption, data, optim = config.caption, config.data, config.optim
    if not caption.checkpoint:
        raise ConfigError('caption.checkpoint is not set: caption training starts from a '
                          'trained anticipation checkpoint')
    model_path = caption.model_path or node.text.model_path
    if not model_path:
        raise ConfigError('no LLM: set caption.model_path or text.model_path in '
                          f'{config.anticipate_config}')
    if not data.train_annotations:
        raise MalmmError('data.train_annotations is not set (EPIC_100_train.csv)')
    model = load_checkpoint(caption.checkpoint, node.model)
    model.requires_grad_(False)
    stored = read_checkpoint_metadata(caption.checkpoint).get('training', {})
    fps = float(stored.get('sample_fps', node.sample_fps))
    capacity = int(stored.get('memory_bank_length', node.memory_bank_length))

    segments = load_segments(data.train_annotations)
    narration = {s.narration_id: s.narration for s in segments}
    windows = FeatureWindows(FeatureStore(data.features_dir),
                             samples_from_segments(segments, data.tau_a, data.tau_o),
                             model.labels, sample_fps=fps, max_lag_s=data.max_feature_lag_s)
    texts = [narration[windows.samples[i].narration_id] for i in windows.kept]
    keep = [i for i, text in enumerate(texts) if text.strip()]
    if not keep:
        raise ValueError('no training windows with a narration (column "narration")')
    _log.info('caption windows: %s, with a narration: %d', json.dumps(windows.summary()),
              len(keep))

    options = GenerationOptions.from_config(node.text)
    describer = TextDescriber.load(model_path, model.config.hidden_size, options=options)
    projector = describer.projector
    projector.requires_grad_(True).train()
    runner = WindowModel(model, capacity)
    queries = window_queries(runner, windows, batch_size=optim.batch_size,
                             progress=progress)[keep]
    texts = [texts[i] for i in keep]

    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=optim.lr,
                                  weight_decay=optim.weight_decay)
    per_epoch = math.ceil(len(texts) / optim.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(per_epoch * optim.epochs, optim.warmup_steps,
                                 optim.min_lr_ratio))
    start, history = 0, []
    if resume:
        state = out_dir / STATE_NAME
        if not state.is_file():
            raise FileNotFoundError(f'--resume: no training state at {state}')
        info = load_training_state(state, model=projector, optimizer=optimizer,
                                   scheduler=scheduler)
        start, history = int(info['epoch']) + 1, list(info.get('history', []))
    end = optim.epochs if stop_after is None else min(optim.epochs, start + stop_after)
    rng = np.random.default_rng(config.seed)
    path = None
    for epoch in range(start, end):
        began = time.perf_counter()
        order = np.random.default_rng(config.seed * 100003 + epoch).permutation(len(texts))
        total = 0.0
        bar = tqdm(range(0, len(texts), optim.batch_size), desc=f'caption {epoch + 1}/'
                   f'{optim.epochs}', unit='batch', disable=not progress)
        for first in bar:
            index = order[first:first + optim.batch_size]
            loss = describer.caption_loss(queries[index], [texts[i] for i in index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if optim.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(projector.parameters(), optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(index)
            bar.set_postfix(loss=f'{total / min(first + len(index), len(texts)):.3f}')
        projector.eval()
        with torch.inference_mode():
            shown = rng.choice(len(texts), size=min(3, len(texts)), replace=False)
            examples = [{'target': texts[i], 'generated': describer.describe(queries[i:i + 1])}
                        for i in shown]
        projector.train()
        record: dict[str, Any] = {'epoch': epoch + 1, 'caption_loss': total / len(texts),
                                  'seconds': round(time.perf_counter() - began, 2),
                                  'examples': examples}
        history.append(record)
        _log.info('epoch %d: caption loss %.4f', epoch + 1, record['caption_loss'])
        info = {'config': config.to_dict(), 'task': 'caption', 'epoch': epoch + 1,
                'history': history, 'anticipation_checkpoint': str(caption.checkpoint),
                **{k: v for k, v in stored.items() if k not in ('config', 'history')}}
        path = save_checkpoint(out_dir / CHECKPOINT_NAME, model, training=info,
                               text_projector=projector)
        save_training_state(out_dir / STATE_NAME, model=projector, optimizer=optimizer,
                            scheduler=scheduler, info={'epoch': epoch, 'history': history})
        (out_dir / METRICS_NAME).write_text(json.dumps(history, indent=2) + '\n')
    return TrainResult(checkpoint=path, best_checkpoint=path, history=history, model=model)
