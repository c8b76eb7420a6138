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

from malmm_ros.config import AnticipateConfig, TextConfig, load_config
from malmm_ros.errors import ConfigError, FrameError, OutputError
from malmm_ros.imaging import check_image, resize_and_crop
from malmm_ros.labels import LabelMaps, action_id, top_pairs
from malmm_ros.pipeline.prediction import ActionScore, ClassScore, Prediction
from malmm_ros.pipeline.sampler import Admission, StreamSampler
from malmm_ros.protocol import Protocol
from malmm_ros.runtime import create_encoder
from malmm_ros.runtime.bundle import BUNDLE_CHECKPOINT, Bundle

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

    `config.runtime` picks what runs the memory, Q-Former and heads: `torch` (the model in
    PyTorch, pipeline/torch_runner.py; `model` and `memory` are its module and StreamMemory)
    or `onnx` (a bundle's graphs on ONNX Runtime with the memory in numpy,
    pipeline/onnx_runner.py; `model` is None). Nothing here imports torch.
    """

    def __init__(self, config: AnticipateConfig, *, encoder: Any | None = None) -> None:
        self.config = config
        self.bundle = Bundle.open(config.bundle) if config.bundle else None
        checkpoint = config.checkpoint or (str(self.bundle.file(BUNDLE_CHECKPOINT))
                                           if self.bundle else '')
        self.checkpoint = checkpoint  # the weights' file ('' for the untrained model)
        if config.runtime == 'onnx':
            from malmm_ros.pipeline.onnx_runner import OnnxRunner

            assert self.bundle is not None  # the config refuses runtime onnx without one
            _check_bundle_model(config, self.bundle)
            self.runner: Any = OnnxRunner(config, self.bundle)
            self.model = None
        else:
            from malmm_ros.pipeline.torch_runner import TorchRunner

            self.runner = TorchRunner(config, checkpoint)
            self.model = self.runner.model
        self.memory = self.runner.memory
        self.trained: bool = self.runner.trained
        self.labels: LabelMaps = self.runner.labels
        self._owns_encoder = encoder is None  # close() frees only what it made
        self.encoder = encoder if encoder is not None else self._create_encoder()
        self.protocol_warnings: list[str] = []
        if checkpoint:
            stored = (self.bundle.protocol if self.bundle else
                      Protocol.stored(self.runner.protocol_metadata or {}))
            self.protocol_warnings = _protocol_mismatches(config, stored, checkpoint)
            for warning in self.protocol_warnings:
                _log.warning('%s', warning)
            if not self.trained:
                _log.warning('%s is marked untrained (malmm-export checkpoint --untrained): '
                             'its predictions are meaningless', config.bundle or checkpoint)
        else:
            _log.warning('no checkpoint configured: the anticipation heads are untrained and '
                         'their predictions are meaningless (set "checkpoint" or "bundle")')
        # The one sampling stage (the node and the evaluator call its admit() themselves,
        # before decoding, and hand the verdict to push()).
        self.sampler = StreamSampler(config.sample_fps, config.max_gap_s)
        self._epoch = self.sampler.epoch  # the sampler's epoch the memory belongs to
        self.stats = {'frames_in': 0, 'frames_sampled': 0, 'resets': 0, 'bad_frames': 0}
        self._origin_ns: int | None = None  # time that time 0 of the memory refers to
        self._newest: tuple[int, str] | None = None  # (stamp_ns, frame_id) in memory
        self._stepped = False  # a frame is in memory since the last reset
        self._latency: dict[str, float] = {}
        self._since_prediction = 0

    def _create_encoder(self) -> Any:
        """The configured encoder; a bundle's ONNX files for ONNX Runtime and TensorRT."""
        config = self.config
        # backend auto resolves precision auto itself, once it knows the backend it chose.
        precision = config.precision if config.backend == 'auto' else config.encoder_precision()
        if config.backend == 'onnxruntime' and precision == 'fp16':
            raise ConfigError('precision fp16 is a TensorRT precision; ONNX Runtime runs fp32 '
                              'or int8 (or set precision: auto)')
        onnx_path, frames = None, None
        if self.bundle is not None:
            # Its INT8 graph for ONNX Runtime int8; the fp32 graph for everything else (TensorRT
            # builds its own precisions from it), so nothing is exported where torch is absent.
            onnx_path = self.bundle.encoder('int8' if config.backend == 'onnxruntime'
                                            and precision == 'int8' else 'fp32')
            if config.backend in ('tensorrt', 'auto') and precision == 'int8':
                frames = self.bundle.calibration_frames()  # what a TensorRT int8 build needs
        return create_encoder(config.backend, device=config.device, threads=config.threads(),
                              precision=precision, engine_dir=config.engine_dir or None,
                              onnx_path=onnx_path, calibration_frames=frames)

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
    def last_queries(self) -> Any:
        """Query outputs [1, Q, D] of the newest sampled frame (None before one, after reset):
        a torch tensor with runtime torch, a numpy array with runtime onnx.

        The next step replaces the array and never writes into it, so a reader (the text
        describer on its own thread) may keep it.
        """
        return self.runner.queries if self._stepped else None

    # Settings that change how frames are fed, not the model or its memory; the text group
    # concerns only a describer beside the pipeline, transport and QoS only the subscription.
    LIVE_SETTINGS = frozenset({'sample_fps', 'publish_every_n', 'max_gap_s', 'stale_after_s',
                               'max_image_side', 'num_threads', 'input_transport',
                               'qos.reliability', 'qos.depth'}
                              | {f'text.{name}' for name in TextConfig.__dataclass_fields__})

    def rebuild_settings(self, config: AnticipateConfig) -> list[str]:
        """The settings of `config` that differ from this pipeline's and need a new pipeline
        (the model, the encoder, the memory); empty when `apply_settings` can take it."""
        old, new = self.config.to_parameters(), config.to_parameters()
        live = self.LIVE_SETTINGS
        if self.config.runtime == 'onnx':  # ONNX Runtime sessions fix their threads
            live = live - {'num_threads'}
        return sorted(k for k in new if new[k] != old[k] and k not in live)

    def apply_settings(self, config: AnticipateConfig) -> None:
        """Take new values of LIVE_SETTINGS without touching the model or the memory.

        ConfigError if anything else differs (`rebuild_settings`): that needs a new pipeline.
        """
        others = self.rebuild_settings(config)
        if others:
            raise ConfigError(f'{", ".join(others)} cannot change on a running pipeline')
        self.sampler.set_rates(config.sample_fps, config.max_gap_s)
        if config.threads() != self.config.threads():
            self.runner.set_threads(config.threads())
        self.config = config

    def close(self) -> None:
        """Free what holds device memory now (TensorRT buffers and streams) instead of at
        garbage collection; the pipeline is not used afterwards. Idempotent."""
        parts = [getattr(self.runner, 'step_graphs', None)]
        if self._owns_encoder:
            parts.append(self.encoder)
        for part in parts:
            close = getattr(part, 'close', None)
            if callable(close):
                close()

    def reset(self) -> None:
        """Forget the stream: memory, sampling grid and time origin."""
        self.sampler.reset()
        self._start_over()

    def _start_over(self) -> None:
        """Empty the memory for the sampler's current epoch."""
        self.runner.reset()
        self._epoch = self.sampler.epoch
        self._origin_ns = None
        self._newest = None
        self._stepped = False
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
        tokens = self.encoder.run(crop[None])  # (1, 49, 1280) float32
        encoded = time.perf_counter()
        if self._origin_ns is None:
            self._origin_ns = admission.time_ns
        now_s = (admission.time_ns - self._origin_ns) * 1e-9
        self.runner.step(tokens, now_s)
        self._stepped = True
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
        if not self._stepped or self._newest is None:
            return None
        start = time.perf_counter()
        verb_p, noun_p, action_p = self._probabilities()
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
            checkpoint=self.config.bundle or self.config.checkpoint,
        )

    def scores(self) -> StepScores | None:
        """Every class's probability after the newest sampled frame (None before one).

        The numbers `predict()` ranks for its top 5, in full: what offline evaluation and the
        challenge submission need.
        """
        if not self._stepped:
            return None
        return StepScores(*self._probabilities())

    # -- helpers ----------------------------------------------------------------------------

    def _probabilities(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The runner's softmax of each head, checked: NaN would reach /malmm/actions as a JSON
        token strict parsers reject, so a non-finite score withholds the prediction."""
        out = self.runner.probabilities()
        for name, probs in zip(('verb', 'noun', 'action'), out, strict=True):
            if probs is not None and not np.isfinite(probs).all():
                raise OutputError(f'the {name} head gave non-finite scores (broken weights or '
                                  'input); prediction withheld')
        return out

    def _top_actions_from_head(self, probs: np.ndarray) -> tuple[ActionScore, ...]:
        out = []
        for i in _top_indices(probs):
            action = self.labels.actions[i]
            out.append(ActionScore(action.id, action.verb_id, action.noun_id, action.name,
                                   float(probs[i])))
        return tuple(out)

    def _top_actions_from_pairs(self, verb_p: np.ndarray, noun_p: np.ndarray
                                ) -> tuple[ActionScore, ...]:
        pairs = top_pairs(verb_p, noun_p, TOP_K)
        labels = self.labels
        return tuple(ActionScore(action_id(v, n), v, n,
                                 f'{labels.verb_name(v)} {labels.noun_name(n)}', score)
                     for v, n, score in pairs)


def _top_indices(probs: np.ndarray) -> list[int]:
    """Indices of the TOP_K largest, largest first (ties: the lower index first)."""
    count = min(TOP_K, probs.size)
    part = np.argpartition(-probs, count - 1)[:count]
    return [int(i) for i in part[np.lexsort((part, -probs[part]))]]


def _top_classes(probs: np.ndarray, name_of: Any) -> tuple[ClassScore, ...]:
    return tuple(ClassScore(i, name_of(i), float(probs[i])) for i in _top_indices(probs))


def _check_bundle_model(config: AnticipateConfig, bundle: Bundle) -> None:
    """ConfigError when the config's model section does not describe the bundle's model
    (the same rule as for a checkpoint: model.* must match what it was trained as)."""
    from malmm_ros.config import model_preset

    stored = dict(bundle.model)
    try:
        found = model_preset(stored.pop('preset', 'edge'), **stored)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f'bundle {bundle.path}: bad model section: {exc}') from None
    diffs = config.model.architecture_differences(found, 'bundle')
    if diffs:
        raise ConfigError(f'bundle {bundle.path} does not match the config: '
                          + '; '.join(diffs))


def _protocol_mismatches(config: AnticipateConfig, stored: dict[str, Any],
                         source: str) -> list[str]:
    """Where the config feeds the memory differently from how the checkpoint was trained.

    Not an error (experimenting with M or the rate is legitimate), but the model then meets a
    memory it never saw in training, so it is said once at start.
    """
    out = []
    for key, value in (('memory_bank_length', config.memory_bank_length),
                       ('sample_fps', config.sample_fps)):
        trained = stored.get(key)
        if isinstance(trained, int | float) and not isinstance(trained, bool) and \
                float(trained) != float(value):
            out.append(f'{key} is {value} but checkpoint {source} was trained with '
                       f'{trained}: predictions may be worse than its validation metrics')
    return out
