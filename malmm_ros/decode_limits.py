"""The most pixels a frame may have, and OpenCV's own decode limit set to it.

OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when its library is loaded (`import cv2`), and
from then on refuses, before allocating it, any image that declares more pixels, whatever the
format. Importing this module sets that variable unless the user chose a value, so it has to be
imported before cv2 is: malmm_ros.imaging imports it first for that reason. It needs
nothing but the standard library, so it is cheap to import early.
"""

from __future__ import annotations

import os

__all__ = ['MAX_DECODE_PIXELS', 'OPENCV_PIXELS_VAR']

MAX_DECODE_PIXELS = 16384 * 16384  # the largest max_image_side (config.py), squared
OPENCV_PIXELS_VAR = 'OPENCV_IO_MAX_IMAGE_PIXELS'

# An empty value counts as unset: OpenCV cannot parse it and aborts the process as it loads.
if not os.environ.get(OPENCV_PIXELS_VAR):
    os.environ[OPENCV_PIXELS_VAR] = str(MAX_DECODE_PIXELS)
