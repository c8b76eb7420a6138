"""The training configuration (config/train.yaml), validated like the node's.

The model architecture, the memory length M and the sampling rate are NOT repeated here: they
come from the anticipation config the node will run (`anticipate_config`), so a checkpoint is
trained with exactly the memory it meets at run time.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from malmm_ros.config import build_config, flatten, read_yaml, spec, validate_fields
from malmm_ros.protocol import DEFAULT_TAU_A, DEFAULT_TAU_O

__all__ = ['CaptionConfig', 'DataConfig', 'MemoryConfig', 'OptimConfig', 'TrainConfig',
           'load_train_config']


@dataclass(frozen=True)
class DataConfig:
    """Where the features and annotations are, and the anticipation protocol."""

    features_dir: str = spec('features', 'per-video feature files written by malmm-extract')
    train_annotations: str = spec('', 'EPIC_100_train.csv (or any EK-100-format CSV)')
    val_annotations: str = spec('', 'optional EPIC_100_validation.csv: metrics every epoch')
    annotations_dir: str = spec('', 'folder with EPIC_100_verb_classes.csv and '
                                'EPIC_100_noun_classes.csv (class names and counts)')
    actions_from_validation: bool = spec(False, 'add validation (verb, noun) pairs to the '
                                         'action vocabulary (the challenges allow it)')
    tau_a: float = spec(DEFAULT_TAU_A, 'anticipation time ta in seconds', 0.0, 3600.0)
    tau_o: float = spec(DEFAULT_TAU_O, 'observed window length to in seconds', 0.01, 36000.0)
    max_feature_lag_s: float = spec(1.0, 'a sampled time whose newest earlier feature frame is '
                                    'older than this is skipped (a gap in the features)',
                                    0.0, 3600.0)

    def __post_init__(self) -> None:
        validate_fields(self, 'data')


@dataclass(frozen=True)
class MemoryConfig:
    """Memory variant; the node always runs 'mbc' with both banks (others: ablations)."""

    policy: str = spec('mbc', 'over capacity: mbc merges the most similar adjacent pair, '
                       'fifo drops the oldest', choices=('mbc', 'fifo'))
    query_memory: bool = spec(True, 'false: no query bank (visual bank only)')
    capacity: int = spec(0, 'memory slots; 0: memory_bank_length of the anticipation config',
                         0, 1000)
    current_frame_only: bool = spec(False, 'feed only the last frame of each window (the '
                                    'no-memory baseline)')

    def __post_init__(self) -> None:
        validate_fields(self, 'memory')


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with a linear warm-up and cosine decay; losses on verb, noun and action."""

    epochs: int = spec(10, 'passes over the training windows', 1, 10000)
    batch_size: int = spec(16, 'windows per optimizer micro-batch (windows of one length)',
                           1, 4096)
    grad_accum: int = spec(1, 'micro-batches per optimizer step', 1, 1024)
    lr: float = spec(3e-4, 'peak learning rate', 1e-8, 1.0)
    weight_decay: float = spec(0.05, 'AdamW weight decay (not on norms and biases)', 0.0, 10.0)
    warmup_steps: int = spec(100, 'optimizer steps of linear warm-up', 0, 10**7)
    min_lr_ratio: float = spec(0.01, 'final learning rate as a fraction of lr', 0.0, 1.0)
    label_smoothing: float = spec(0.1, 'cross-entropy label smoothing', 0.0, 0.99)
    class_balanced: bool = spec(False, 'weight classes by 1/sqrt(frequency) (for mean recall)')
    max_grad_norm: float = spec(1.0, 'gradient clipping (0: off)', 0.0, 1e6)
    verb_weight: float = spec(1.0, 'loss weight of the verb head', 0.0, 100.0)
    noun_weight: float = spec(1.0, 'loss weight of the noun head', 0.0, 100.0)
    action_weight: float = spec(1.0, 'loss weight of the action head', 0.0, 100.0)
    amp: bool = spec(True, 'mixed precision (bf16 autocast) on CUDA; ignored on CPU')

    def __post_init__(self) -> None:
        validate_fields(self, 'optim')


@dataclass(frozen=True)
class CaptionConfig:
    """`task: caption`: train the text projector of an anticipation checkpoint (LLM frozen)."""

    checkpoint: str = spec('', 'trained anticipation checkpoint whose Q-Former feeds the LLM')
    model_path: str = spec('', 'local causal LM folder; empty: text.model_path of the '
                           'anticipation config')

    def __post_init__(self) -> None:
        validate_fields(self, 'caption')


@dataclass(frozen=True)
class TrainConfig:
    """Everything malmm-train needs; mirrors config/train.yaml."""

    anticipate_config: str = spec('config/anticipate.yaml', 'the node\'s config: model '
                                  'architecture, memory_bank_length and sample_fps')
    task: str = spec('anticipation', 'what to train', choices=('anticipation', 'caption'))
    out_dir: str = spec('runs/train', 'checkpoint, training state and metrics go here')
    device: str = spec('auto', 'auto: cuda when available', choices=('auto', 'cpu', 'cuda'))
    seed: int = spec(0, 'seed of initialisation and shuffling', 0, 2**31 - 1)
    num_threads: int = spec(0, 'CPU threads (0: all cores but one)', 0, 256)
    eval_every: int = spec(1, 'validate every n epochs when val_annotations is set', 1, 10000)
    data: DataConfig = field(default_factory=DataConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)

    def __post_init__(self) -> None:
        validate_fields(self, '')

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with fields changed; dotted names reach into groups ('optim.lr': 1e-3)."""
        return TrainConfig.from_dict({**flatten(self.to_dict()), **changes})

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = '<dict>') -> TrainConfig:
        return build_config(cls, flatten(data), source)


def load_train_config(path: str | os.PathLike | None = None,
                      overrides: dict[str, Any] | None = None) -> TrainConfig:
    """config/train.yaml (relative paths resolved against the current folder) plus overrides."""
    data = {} if path is None else read_yaml(path, what='training config', empty_ok=True)
    merged = {**flatten(data), **(overrides or {})}
    return TrainConfig.from_dict(merged, source=str(path) if path else '<defaults>')
