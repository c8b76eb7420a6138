"""The ROS-free streaming API: push camera frames, get next-action predictions.

    image -> sampler -> resize/crop -> encoder -> adapter + Q-Former step (memory) -> heads

One `AnticipationPipeline` owns one stream's memory. The node, the evaluation tools and the demo
all drive it the same way.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, NamedTuple

import numpy as np
import torch

from malmm_ros.config import AnticipateConfig, TextConfig, load_config
from malmm_ros.errors import ConfigError, FrameError, OutputError
from malmm_ros.imaging import check_image, resize_and_crop
from malmm_ros.labels import LabelMaps, action_id, top_pairs
from malmm_ros.model.checkpoint import (
    checkpoint_is_trained,
    load_checkpoint,
    read_checkpoint_metadata,
    untrained_model,
)
from malmm_ros.model.memory import MemorySpec
from malmm_ros.pipeline.prediction import ActionScore, ClassScore, Prediction
from malmm_ros.pipeline.sampler import Admission, StreamSampler
from malmm_ros.protocol import Protocol
from malmm_ros.runtime import create_encoder

__all__ = ['AnticipationPipeline', 'StepScores']

_log = logging.getLogger(__name__)
TOP_K = 5


class StepScores(NamedTuple):
    """Probabilities of every class after one step (float32 numpy arrays)."""

    verb: np.ndarray  # (num_verbs,)
    noun: np.ndarray  # (num_nouns,)
    action: np.ndarray | None  # (num_actions,) in labels.actions order; None without an
    # action head, when actions are scored as p(verb) * p(noun)


class AnticipationPipeline:
    """Streaming MA-LMM anticipation for one camera.

    `push(image, stamp_ns)` returns a Prediction every `publish_every_n` sampled frames, else
    None. A stamp going backwards (a looping bag) or jumping by more than `max_gap_s` resets the
    memory first; both are counted in `stats`.
    """

    def __init__(self, config: AnticipateConfig, *, encoder: Any | None = None) -> None:
        self.config = config
        torch.set_num_threads(config.threads())
        self.device = torch.device(config.device)
        self.encoder = encoder if encoder is not None else create_encoder(
            config.backend, device=config.device, threads=config.threads(),
            precision=config.precision, engine_dir=config.engine_dir or None)
        self.protocol_warnings: list[str] = []
        if config.checkpoint:
            self.model = load_checkpoint(config.checkpoint, config.model, device=self.device)
            self.protocol_warnings = _protocol_mismatches(config)
            for warning in self.protocol_warnings:
                _log.warning('%s', warning)
            self.trained = checkpoint_is_trained(config.checkpoint)
            if not self.trained:
                _log.warning('checkpoint %s is marked untrained (malmm-export checkpoint '
                             '--untrained): its predictions are meaningless', config.checkpoint)
        else:
            self.model = untrained_model(config).to(self.device)
            self.trained = False
            _log.warning('no checkpoint configured: the anticipation heads are untrained and '
                         'their predictions are meaningless (set "checkpoint")')
        self.labels: LabelMaps = self.model.labels
        self.memory = self.model.new_memory(MemorySpec(
            config.memory_bank_length, cache_projections=not config.model.recompute_projections))
        # The one sampling stage (the node and the evaluator call its admit() themselves,
        # before decoding, and hand the verdict to push()).
        self.sampler = StreamSampler(config.sample_fps, config.max_gap_s)
        self._epoch = self.sampler.epoch  # the sampler's epoch the memory belongs to
        self.stats = {'frames_in': 0, 'frames_sampled': 0, 'resets': 0, 'bad_frames': 0}
        self._origin_ns: int | None = None  # time that time 0 of the memory refers to
        self._newest: tuple[int, str] | None = None  # (stamp_ns, frame_id) in memory
        self._queries: torch.Tensor | None = None  # last step's query outputs (B, Q, D)
        self._latency: dict[str, float] = {}
        self._since_prediction = 0

    @classmethod
    def from_config(cls, source: str | os.PathLike | dict[str, Any] | AnticipateConfig | None
                    = None, **overrides: Any) -> AnticipationPipeline:
        """Build from config/anticipate.yaml, a dict or a config; `overrides` replace top-level
        fields (e.g. checkpoint=...)."""
        config = load_config(source)
        if overrides:
            config = config.replace(**overrides)
        return cls(config)

    @property
    def model_name(self) -> str:
        return f'malmm-{self.config.model.preset}'

    @property
    def last_latency_ms(self) -> dict[str, float]:
        """Encoder and memory milliseconds of the newest sampled frame (empty before one)."""
        return dict(self._latency)

    @property
    def last_queries(self) -> torch.Tensor | None:
        """Query outputs [1, Q, D] of the newest sampled frame (None before one, after reset).

        The next step replaces the tensor and never writes into it, so a reader (the text
        describer on its own thread) may keep it.
        """
        return self._queries

    # Settings that change how frames are fed, not the model or its memory; the text group
    # concerns only a describer beside the pipeline.
    LIVE_SETTINGS = frozenset({'sample_fps', 'publish_every_n', 'max_gap_s', 'stale_after_s',
                               'max_image_side', 'num_threads'}
                              | {f'text.{name}' for name in TextConfig.__dataclass_fields__})

    def rebuild_settings(self, config: AnticipateConfig) -> list[str]:
        """The settings of `config` that differ from this pipeline's and need a new pipeline
        (the model, the encoder, the memory); empty when `apply_settings` can take it."""
        old, new = self.config.to_parameters(), config.to_parameters()
        return sorted(k for k in new if new[k] != old[k] and k not in self.LIVE_SETTINGS)

    def apply_settings(self, config: AnticipateConfig) -> None:
        """Take new values of LIVE_SETTINGS without touching the model or the memory.

        ConfigError if anything else differs (`rebuild_settings`): that needs a new pipeline.
        """
        others = self.rebuild_settings(config)
        if others:
            raise ConfigError(f'{", ".join(others)} cannot change on a running pipeline')
        self.sampler.set_rates(config.sample_fps, config.max_gap_s)
        if config.threads() != self.config.threads():
            torch.set_num_threads(config.threads())
        self.config = config

    def reset(self) -> None:
        """Forget the stream: memory, sampling grid and time origin."""
        self.sampler.reset()
        self._start_over()

    def _start_over(self) -> None:
        """Empty the memory for the sampler's current epoch."""
        self.memory.reset()
        self._epoch = self.sampler.epoch
        self._origin_ns = None
        self._newest = None
        self._queries = None
        self._since_prediction = 0

    def push(self, image: np.ndarray, stamp_ns: int, frame_id: str = '', *,
             admission: Admission | None = None, arrival_ns: int | None = None
             ) -> Prediction | None:
        """Feed one HxWx3 uint8 RGB frame stamped `stamp_ns` (any size).

        The frame goes through `self.sampler` first, with its arrival time (monotonic ns) when
        known; a caller that sampled before decoding passes the sampler's `admission` instead.
        Raises FrameError for an unusable image; the memory is untouched in that case.
        """
        try:
            check_image(image)  # before any state changes: a bad frame leaves no trace
        except FrameError:
            self.stats['bad_frames'] += 1
            raise
        self.stats['frames_in'] += 1
        if admission is None:
            admission = self.sampler.admit(int(stamp_ns), arrival_ns)
        if admission.epoch != self._epoch:
            _log.warning('memory reset: %s', admission.reset_reason or 'the stream restarted')
            self._start_over()
            self.stats['resets'] += 1
        if not admission.accepted:
            return None

        start = time.perf_counter()
        crop = resize_and_crop(image)
        tokens = torch.from_numpy(self.encoder.run(crop[None])).to(self.device)  # (1, 49, 1280)
        encoded = time.perf_counter()
        if self._origin_ns is None:
            self._origin_ns = admission.time_ns
        now_s = (admission.time_ns - self._origin_ns) * 1e-9
        with torch.inference_mode():
            self._queries = self.model.step(tokens.to(_model_dtype(self.model)), now_s,
                                            self.memory)
        stepped = time.perf_counter()
        self._latency = {'encoder': (encoded - start) * 1e3, 'memory': (stepped - encoded) * 1e3}
        self._newest = (int(stamp_ns), frame_id)
        self.stats['frames_sampled'] += 1
        self._since_prediction += 1
        if self._since_prediction < self.config.publish_every_n:
            return None
        return self.predict()

    def predict(self) -> Prediction | None:
        """A prediction from the memory as it stands (None before the first sampled frame)."""
        if self._queries is None or self._newest is None:
            return None
        start = time.perf_counter()
        with torch.inference_mode():
            verb_p, noun_p, action_p = self._probabilities(self._queries)
            verbs = _top_classes(verb_p, self.labels.verb_name)
            nouns = _top_classes(noun_p, self.labels.noun_name)
            if action_p is not None:
                actions = self._top_actions_from_head(action_p)
            else:
                actions = self._top_actions_from_pairs(verb_p, noun_p)
        heads_ms = (time.perf_counter() - start) * 1e3
        self._since_prediction = 0
        latency = {**self._latency, 'heads': heads_ms}
        latency['total'] = sum(latency.values())
        return Prediction(
            stamp_ns=self._newest[0],
            frame_id=self._newest[1],
            frames_seen=self.memory.frames_seen,
            memory_slots=len(self.memory),
            verbs=verbs,
            nouns=nouns,
            actions=actions,
            latency_ms=latency,
            model_name=self.model_name,
            trained=self.trained,
            checkpoint=self.config.checkpoint,
        )

    def scores(self) -> StepScores | None:
        """Every class's probability after the newest sampled frame (None before one).

        The numbers `predict()` ranks for its top 5, in full: what offline evaluation and the
        challenge submission need.
        """
        if self._queries is None:
            return None
        with torch.inference_mode():
            verb_p, noun_p, action_p = self._probabilities(self._queries)
        return StepScores(verb_p.cpu().numpy(), noun_p.cpu().numpy(),
                          None if action_p is None else action_p.cpu().numpy())

    # -- helpers ----------------------------------------------------------------------------

    def _probabilities(self, queries: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Softmax of each head for one stream: verb [V], noun [N], action [A] or None."""
        logits = self.model.classify(queries)
        action = logits.action.float().softmax(-1)[0] if logits.action is not None else None
        verb, noun = logits.verb.float().softmax(-1)[0], logits.noun.float().softmax(-1)[0]
        for name, probs in (('verb', verb), ('noun', noun), ('action', action)):
            # NaN would reach /malmm/actions as a JSON token strict parsers reject; never publish.
            if probs is not None and not bool(torch.isfinite(probs).all()):
                raise OutputError(f'the {name} head gave non-finite scores (broken weights or '
                                  'input); prediction withheld')
        return verb, noun, action

    def _top_actions_from_head(self, probs: torch.Tensor) -> tuple[ActionScore, ...]:
        scores, index = probs.topk(min(TOP_K, probs.numel()))
        out = []
        for score, i in zip(scores.tolist(), index.tolist(), strict=True):
            action = self.labels.actions[i]
            out.append(ActionScore(action.id, action.verb_id, action.noun_id, action.name, score))
        return tuple(out)

    def _top_actions_from_pairs(self, verb_p: torch.Tensor, noun_p: torch.Tensor
                                ) -> tuple[ActionScore, ...]:
        pairs = top_pairs(verb_p.cpu().numpy(), noun_p.cpu().numpy(), TOP_K)
        labels = self.labels
        return tuple(ActionScore(action_id(v, n), v, n,
                                 f'{labels.verb_name(v)} {labels.noun_name(n)}', score)
                     for v, n, score in pairs)


def _top_classes(probs: torch.Tensor, name_of: Any) -> tuple[ClassScore, ...]:
    scores, index = probs.topk(min(TOP_K, probs.numel()))
    return tuple(ClassScore(i, name_of(i), s)
                 for s, i in zip(scores.tolist(), index.tolist(), strict=True))


def _protocol_mismatches(config: AnticipateConfig) -> list[str]:
    """Where the config feeds the memory differently from how the checkpoint was trained.

    Not an error (experimenting with M or the rate is legitimate), but the model then meets a
    memory it never saw in training, so it is said once at start.
    """
    stored = Protocol.stored(read_checkpoint_metadata(config.checkpoint))
    out = []
    for key, value in (('memory_bank_length', config.memory_bank_length),
                       ('sample_fps', config.sample_fps)):
        trained = stored.get(key)
        if isinstance(trained, int | float) and not isinstance(trained, bool) and \
                float(trained) != float(value):
            out.append(f'{key} is {value} but checkpoint {config.checkpoint} was trained with '
                       f'{trained}: predictions may be worse than its validation metrics')
    return out


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
