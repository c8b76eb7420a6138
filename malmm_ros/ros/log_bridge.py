"""Route the core's `logging` records (malmm_ros.*) to the node's ROS logger.

The ROS-free core logs with the standard library; inside the node those lines (the backend
`auto` chose, memory resets, protocol mismatches) belong in the ROS log with the node's name,
where `ros2 launch` and rosout show them.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ['RosLogHandler', 'route_core_logging']


class RosLogHandler(logging.Handler):
    """A logging.Handler that writes each record through an rclpy logger."""

    def __init__(self, ros_logger: Any) -> None:
        super().__init__()
        self.ros_logger = ros_logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            if record.levelno >= logging.ERROR:
                self.ros_logger.error(text)
            elif record.levelno >= logging.WARNING:
                self.ros_logger.warning(text)
            elif record.levelno >= logging.INFO:
                self.ros_logger.info(text)
            else:
                self.ros_logger.debug(text)
        except Exception:  # logging must never take the node down
            self.handleError(record)


def route_core_logging(ros_logger: Any, level: int = logging.INFO) -> RosLogHandler:
    """Send malmm_ros.* records at `level` and above to `ros_logger` (and nowhere else)."""
    core = logging.getLogger('malmm_ros')
    for handler in list(core.handlers):
        if isinstance(handler, RosLogHandler):
            core.removeHandler(handler)
    handler = RosLogHandler(ros_logger)
    core.addHandler(handler)
    core.setLevel(level)
    core.propagate = False
    return handler
