"""Offline evaluation of anticipation checkpoints on EK-100 (no ROS imports).

- timeline: the pipeline over a camera bag, every prediction with its full scores (direct mode)
- scoring: the prediction that answers each segment, and the EK-100 metrics of them
- feature_scores: a whole split from extracted features (features mode)
- submission: the challenge submission JSON
- report: metrics JSON, markdown summary and plots
- modes: direct and features mode from files to an Evaluation

Live mode needs ROS: malmm_ros.ros.live_eval.
"""

from __future__ import annotations

from malmm_ros.evaluation.feature_scores import (
    feature_segment_scores,
)
from malmm_ros.evaluation.modes import (
    AnnotationContext,
    Checkpoint,
    evaluate_direct,
    evaluate_features,
    evaluate_timeline,
    load_annotations,
    node_config,
    open_checkpoint,
    video_segments,
)
from malmm_ros.evaluation.report import (
    EVAL_FORMAT,
    Evaluation,
    latency_summary,
    metric_gap,
    write_metrics,
    write_report,
)
from malmm_ros.evaluation.scoring import (
    ScoreRows,
    SegmentScores,
    prediction_at,
    score_segments,
    segment_metrics,
)
from malmm_ros.evaluation.submission import submission, write_submission
from malmm_ros.evaluation.timeline import Timeline, bag_timeline, timeline_from_predictions

__all__ = [
    'EVAL_FORMAT',
    'AnnotationContext',
    'Checkpoint',
    'Evaluation',
    'ScoreRows',
    'SegmentScores',
    'Timeline',
    'bag_timeline',
    'evaluate_direct',
    'evaluate_features',
    'evaluate_timeline',
    'feature_segment_scores',
    'latency_summary',
    'load_annotations',
    'metric_gap',
    'node_config',
    'open_checkpoint',
    'prediction_at',
    'score_segments',
    'segment_metrics',
    'submission',
    'timeline_from_predictions',
    'video_segments',
    'write_metrics',
    'write_report',
    'write_submission',
]
