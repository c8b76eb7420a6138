"""The anticipation protocol a checkpoint is trained and evaluated with, one typed record.

Training writes it into the checkpoint's `training` metadata (flat keys, the format the files
already use); the pipeline, the evaluation and caption training read it back through
`Protocol.stored` / `Protocol.from_metadata`, never by string keys of their own. Defaults are the
EK-100 protocol (REFERENCE.md: ta = 1 s; our observed window to = 10 s as AVT and AFFT).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from malmm_ros.errors import CheckpointError

__all__ = ['DEFAULT_TAU_A', 'DEFAULT_TAU_O', 'Protocol']

DEFAULT_TAU_A = 1.0
DEFAULT_TAU_O = 10.0


@dataclass(frozen=True)
class Protocol:
    """How a model observes a video before anticipating (CheckpointError when invalid)."""

    tau_a: float = DEFAULT_TAU_A  # anticipation time ta, seconds before the action starts
    tau_o: float = DEFAULT_TAU_O  # observed window length to, seconds
    sample_fps: float = 1.0  # frames per second fed to the memory
    memory_bank_length: int = 20  # memory capacity M, slots
    max_feature_lag_s: float = 1.0  # features mode: skip a sampled time with no feature this near

    def __post_init__(self) -> None:
        for name in ('tau_a', 'tau_o', 'sample_fps', 'max_feature_lag_s'):
            value = getattr(self, name)
            positive = name in ('tau_o', 'sample_fps')
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise CheckpointError(f'{name} must be a finite number >= 0 (> 0 for tau_o and '
                                      f'sample_fps), got {value!r}')
        length = self.memory_bank_length
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise CheckpointError(f'memory_bank_length must be a positive integer, got '
                                  f'{length!r}')

    def to_dict(self) -> dict[str, Any]:
        """The flat keys training writes into a checkpoint's `training` metadata."""
        return dataclasses.asdict(self)

    @staticmethod
    def stored(metadata: Mapping[str, Any]) -> dict[str, Any]:
        """The protocol fields a checkpoint's metadata records (absent ones left out).

        max_feature_lag_s may sit in the training config of older files (data section).
        """
        info = metadata.get('training')
        info = info if isinstance(info, Mapping) else {}
        found = {f.name: info[f.name] for f in dataclasses.fields(Protocol) if f.name in info}
        config = info.get('config')
        data = config.get('data') if isinstance(config, Mapping) else None
        if 'max_feature_lag_s' not in found and isinstance(data, Mapping) and \
                'max_feature_lag_s' in data:
            found['max_feature_lag_s'] = data['max_feature_lag_s']
        return found

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], **overrides: Any) -> Protocol:
        """The protocol a checkpoint was trained with, then `overrides` (None values ignored);
        fields it does not record keep the defaults."""
        values = {**cls.stored(metadata), **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return cls(**values)
        except TypeError as exc:
            raise CheckpointError(f'bad protocol settings: {exc}') from None
