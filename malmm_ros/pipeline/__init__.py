"""Streaming anticipation without ROS: frames in, predictions out."""

from malmm_ros.pipeline.anticipation import AnticipationPipeline, StepScores
from malmm_ros.pipeline.prediction import SCHEMA, ActionScore, ClassScore, Prediction
from malmm_ros.pipeline.sampler import FrameSampler

__all__ = ['SCHEMA', 'ActionScore', 'AnticipationPipeline', 'ClassScore', 'FrameSampler',
           'Prediction', 'StepScores']
