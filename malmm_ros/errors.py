"""Error hierarchy shared by every malmm_ros module.

Messages name the file, field or value at fault so a user can fix the input without reading code.
"""

from __future__ import annotations

__all__ = ['CheckpointError', 'ConfigError', 'DataError', 'FrameError', 'MalmmError',
           'OutputError']


class MalmmError(Exception):
    """Base class of every error malmm_ros raises on purpose."""


class ConfigError(MalmmError, ValueError):
    """A configuration value or parameter file is invalid."""


class CheckpointError(MalmmError):
    """A checkpoint or weight file is missing, unreadable or does not match the config."""


class FrameError(MalmmError, ValueError):
    """An input image cannot be used (wrong shape, dtype, encoding or size)."""


class DataError(MalmmError):
    """An annotation or feature file is malformed."""


class OutputError(MalmmError):
    """A model output that must not be published (not finite: broken weights or input)."""
