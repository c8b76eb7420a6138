"""Draw the current top-5 actions on a frame, for watching the node in rqt or Foxglove."""

from __future__ import annotations

import cv2
import numpy as np

from malmm_ros.pipeline import Prediction

__all__ = ['draw_overlay']


def draw_overlay(rgb: np.ndarray, prediction: Prediction | None) -> np.ndarray:
    """A copy of `rgb` (HxWx3 uint8) with the top-5 actions and scores on a dark band."""
    frame = np.ascontiguousarray(rgb).copy()
    height, width = frame.shape[:2]
    scale = max(0.35, min(width, height) / 640.0)
    line = int(22 * scale) + 2
    lines = ['malmm_ros: waiting for a prediction'] if prediction is None else [
        f'{a.score:5.3f}  {a.name}' for a in prediction.actions]
    if prediction is not None and not prediction.trained:
        lines.insert(0, 'UNTRAINED heads')
    band = min(height, line * (len(lines) + 1))
    frame[:band] = (frame[:band] * 0.35).astype(np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(frame, text, (8, line * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale,
                    (255, 255, 255), max(1, int(scale * 1.5)), cv2.LINE_AA)
    return frame
