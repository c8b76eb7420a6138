"""EPIC-KITCHENS-100 annotation and label handling (no ROS imports)."""

from __future__ import annotations

from malmm_ros.data.labels import (
    ActionLabel,
    ClassLabel,
    LabelMaps,
    action_id,
    load_class_csv,
    load_ek100_labels,
)

__all__ = [
    'ActionLabel',
    'ClassLabel',
    'LabelMaps',
    'action_id',
    'load_class_csv',
    'load_ek100_labels',
]
