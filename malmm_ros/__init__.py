"""malmm_ros: online action anticipation with MA-LMM long-term memory, for ROS 2.

The core (model, pipeline, data, metrics) imports no ROS; `malmm_ros.ros` is the thin adapter.
"""

__version__ = '0.1.0'

# First, before any module of the package loads OpenCV: it reads its pixel limit as it loads.
from malmm_ros import decode_limits as _decode_limits  # noqa: E402, F401
