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

from malmm_ros.data.epic import load_segments, samples_from_segments
from malmm_ros.data.features import FeatureStore
from malmm_ros.errors import ConfigError, DataError
from malmm_ros.model.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.model.memory import MemorySpec
from malmm_ros.model.text import GenerationOptions, TextDescriber
from malmm_ros.protocol import Protocol
from malmm_ros.training.config import TrainConfig
from malmm_ros.training.loop import Learner, TrainResult, epoch_seed, prepare_run, run_epochs
from malmm_ros.training.streaming import WindowModel, window_queries
from malmm_ros.training.windows import FeatureWindows

__all__ = ['run_caption']

_log = logging.getLogger(__name__)
# Keys of the anticipation checkpoint's training section that describe that run, not this one.
_NOT_INHERITED = ('config', 'history', 'epoch', 'step', 'task')


def run_caption(config: TrainConfig, *, resume: bool = False, progress: bool = True,
                stop_after: int | None = None) -> TrainResult:
    """Train the projector; writes out_dir/checkpoint.safetensors (model + projector)."""
    node = prepare_run(config)
    caption = config.caption
    if not caption.checkpoint:
        raise ConfigError('caption.checkpoint is not set: caption training starts from a '
                          'trained anticipation checkpoint')
    model_path = caption.model_path or node.text.model_path
    if not model_path:
        raise ConfigError('no LLM: set caption.model_path or text.model_path in '
                          f'{config.anticipate_config}')
    model = load_checkpoint(caption.checkpoint, node.model)
    model.requires_grad_(False)
    stored = Protocol.stored(read_checkpoint_metadata(caption.checkpoint))
    windows, texts = _narrated_windows(config, model, float(stored.get('sample_fps',
                                                                       node.sample_fps)))
    describer = TextDescriber.load(model_path, model.config.hidden_size,
                                   options=GenerationOptions.from_config(node.text))
    projector = describer.projector
    projector.requires_grad_(True).train()
    runner = WindowModel(model, MemorySpec(
        int(stored.get('memory_bank_length', node.memory_bank_length))))
    queries = window_queries(runner, windows, batch_size=config.optim.batch_size,
                             progress=progress)
    keep = [i for i, text in enumerate(texts) if text.strip()]
    learner = Learner.adamw(projector, projector.parameters(), config.optim,
                            math.ceil(len(keep) / config.optim.batch_size))
    task = _Caption(config, model, describer, learner, queries[keep], [texts[i] for i in keep],
                    progress=progress)
    info = {**{k: v for k, v in stored.items() if k not in _NOT_INHERITED}, 'task': 'caption',
            'anticipation_checkpoint': str(caption.checkpoint)}
    result = run_epochs(task, config, info=info, resume=resume, stop_after=stop_after)
    result.model = model
    return result


def _narrated_windows(config: TrainConfig, model: MalmmModel, fps: float
                      ) -> tuple[FeatureWindows, list[str]]:
    """The training windows and the narration each is to predict; DataError when none has one."""
    data = config.data
    segments = load_segments(data.train_annotations)
    narration = {s.narration_id: s.narration for s in segments}
    windows = FeatureWindows(FeatureStore(data.features_dir),
                             samples_from_segments(segments, data.tau_a, data.tau_o),
                             model.labels, sample_fps=fps, max_lag_s=data.max_feature_lag_s)
    texts = [narration[windows.samples[i].narration_id] for i in windows.kept]
    narrated = sum(1 for text in texts if text.strip())
    if not narrated:
        raise DataError(f'{data.train_annotations}: no training windows with a narration '
                        '(column "narration")')
    _log.info('caption windows: %s, with a narration: %d', json.dumps(windows.summary()),
              narrated)
    return windows, texts


class _Caption:
    """The caption task on the run skeleton: the projector learns, everything else is frozen.

    Nothing before the projector learns, so each window's queries are computed once and reused
    every epoch.
    """

    def __init__(self, config: TrainConfig, model: MalmmModel, describer: TextDescriber,
                 learner: Learner, queries: torch.Tensor, texts: list[str], *,
                 progress: bool) -> None:
        self.config, self.model, self.describer, self.learner = config, model, describer, learner
        self.queries, self.texts, self.progress = queries, texts, progress
        self.shown = np.random.default_rng(config.seed)  # which examples each epoch shows

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        optim, texts = self.config.optim, self.texts
        began = time.perf_counter()
        order = np.random.default_rng(epoch_seed(self.config.seed, epoch)).permutation(len(texts))
        total = 0.0
        bar = tqdm(range(0, len(texts), optim.batch_size), desc=f'caption {epoch + 1}/'
                   f'{optim.epochs}', unit='batch', disable=not self.progress)
        for first in bar:
            index = order[first:first + optim.batch_size]
            loss = self.describer.caption_loss(self.queries[index], [texts[i] for i in index])
            loss.backward()
            self.learner.step()
            total += float(loss.detach()) * len(index)
            bar.set_postfix(loss=f'{total / min(first + len(index), len(texts)):.3f}')
        return {'epoch': epoch + 1, 'caption_loss': total / len(texts),
                'seconds': round(time.perf_counter() - began, 2), 'examples': self._examples()}

    def _examples(self) -> list[dict[str, str]]:
        """Up to three training windows: their target and what the projector makes the LLM say."""
        projector = self.describer.projector
        projector.eval()
        with torch.inference_mode():
            shown = self.shown.choice(len(self.texts), size=min(3, len(self.texts)),
                                      replace=False)
            examples = [{'target': self.texts[i],
                         'generated': self.describer.describe(self.queries[i:i + 1])}
                        for i in shown]
        projector.train()
        return examples

    def save(self, path: Path, training: dict[str, Any]) -> Path:
        return save_checkpoint(path, self.model, training=training,
                               text_projector=self.describer.projector)

    def score(self, record: dict[str, Any]) -> None:
        return None  # no validation: the last checkpoint is the one to use
