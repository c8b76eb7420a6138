"""EPIC-KITCHENS-100 annotation and label handling (no ROS imports)."""

from __future__ import annotations

from malmm_ros.data.epic import (
    AnticipationSample,
    EpicAnnotations,
    Segment,
    VideoInfo,
    action_label_indices,
    action_vocabulary,
    anticipation_samples,
    format_timestamp,
    is_tail_action,
    load_segments,
    load_tail_classes,
    load_unseen_participants,
    load_video_info,
    observation_times,
    observed_mask,
    parse_timestamp,
    samples_from_segments,
)
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
    'AnticipationSample',
    'ClassLabel',
    'EpicAnnotations',
    'LabelMaps',
    'Segment',
    'VideoInfo',
    'action_id',
    'action_label_indices',
    'action_vocabulary',
    'anticipation_samples',
    'format_timestamp',
    'is_tail_action',
    'load_class_csv',
    'load_ek100_labels',
    'load_segments',
    'load_tail_classes',
    'load_unseen_participants',
    'load_video_info',
    'observation_times',
    'observed_mask',
    'parse_timestamp',
    'samples_from_segments',
]
