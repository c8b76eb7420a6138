"""A prediction and its `/malmm/actions` JSON (schema malmm_ros/actions/v1)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from malmm_ros.stamps import stamp_dict

__all__ = ['SCHEMA', 'ActionScore', 'ClassScore', 'Prediction']

SCHEMA = 'malmm_ros/actions/v1'


class ClassScore(NamedTuple):
    id: int
    name: str
    score: float


class ActionScore(NamedTuple):
    id: int  # verb_id * 1000 + noun_id (EK-100 challenge convention)
    verb_id: int
    noun_id: int
    name: str
    score: float


@dataclass(frozen=True)
class Prediction:
    """Top-k next verbs, nouns and actions after the newest frame in memory.

    Scores are probabilities in [0, 1], sorted descending.
    """

    stamp_ns: int  # stamp of the newest frame in memory
    frame_id: str
    frames_seen: int
    memory_slots: int
    verbs: tuple[ClassScore, ...]
    nouns: tuple[ClassScore, ...]
    actions: tuple[ActionScore, ...]
    latency_ms: dict[str, float] = field(default_factory=dict)
    model_name: str = ''
    trained: bool = False
    checkpoint: str = ''

    def to_json(self) -> str:
        """The v1 JSON text; strict (a non-finite number raises ValueError, never 'NaN')."""
        return json.dumps(self.to_dict(), allow_nan=False)

    def to_dict(self) -> dict[str, Any]:
        """The v1 JSON object published on /malmm/actions."""
        return {
            'schema': SCHEMA,
            'stamp': stamp_dict(self.stamp_ns),
            'frame_id': self.frame_id,
            'frames_seen': self.frames_seen,
            'memory_slots': self.memory_slots,
            'verb': [s._asdict() for s in self.verbs],
            'noun': [s._asdict() for s in self.nouns],
            'action': [s._asdict() for s in self.actions],
            'latency_ms': {key: round(value, 3) for key, value in self.latency_ms.items()},
            'model': {'name': self.model_name, 'trained': self.trained,
                      'checkpoint': self.checkpoint},
        }
