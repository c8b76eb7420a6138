"""EPIC-KITCHENS-100 annotations, bags, features and extraction (no ROS imports).

The label vocabularies (LabelMaps, class CSVs) live one layer down in malmm_ros.labels: the
model's checkpoints carry them.
"""

from __future__ import annotations

from malmm_ros.data.epic import (
    AnticipationSample,
    Segment,
    VideoInfo,
    action_label_indices,
    action_vocabulary,
    anticipation_samples,
    format_timestamp,
    load_segments,
    load_tail_classes,
    load_unseen_participants,
    load_video_info,
    observation_times,
    observed_mask,
    parse_timestamp,
    samples_from_segments,
)

__all__ = [
    'AnticipationSample',
    'Segment',
    'VideoInfo',
    'action_label_indices',
    'action_vocabulary',
    'anticipation_samples',
    'format_timestamp',
    'load_segments',
    'load_tail_classes',
    'load_unseen_participants',
    'load_video_info',
    'observation_times',
    'observed_mask',
    'parse_timestamp',
    'samples_from_segments',
]
