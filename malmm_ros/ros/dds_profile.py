"""The package's Fast DDS profile, applied by our own programs when the user chose none.

With Fast DDS's defaults a best-effort subscriber loses most camera-sized samples (a frame is
larger than the default shared-memory segment and socket buffers; see config/fastdds.xml), so a
user who follows the README without exporting FASTDDS_DEFAULT_PROFILES_FILE would get a third of
the frames. Fast DDS reads the variable when the first participant is created, so this must run
before `rclpy.init`. A profile the user set, or another RMW, is left alone.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ['PROFILE_VARIABLE', 'apply_default_profile', 'package_profile']

PROFILE_VARIABLE = 'FASTDDS_DEFAULT_PROFILES_FILE'
_FILENAME = 'fastdds.xml'


def package_profile() -> Path | None:
    """config/fastdds.xml of the installed package (colcon or pip) or of this checkout."""
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory('malmm_ros')) / 'config')
    except Exception:  # not installed through colcon/ament: look beside the code instead
        pass
    candidates.append(Path(sys.prefix) / 'share' / 'malmm_ros' / 'config')
    candidates.append(Path(__file__).resolve().parents[2] / 'config')
    for folder in candidates:
        if (folder / _FILENAME).is_file():
            return folder / _FILENAME
    return None


def apply_default_profile(environ: dict[str, str] | None = None) -> str:
    """Set FASTDDS_DEFAULT_PROFILES_FILE to the package's profile if nothing is set; returns a
    sentence saying which profile is in effect (for the start-up log)."""
    env = os.environ if environ is None else environ
    rmw = env.get('RMW_IMPLEMENTATION', '') or 'rmw_fastrtps_cpp (default)'
    if 'fastrtps' not in rmw and 'fastdds' not in rmw:
        return f'RMW {rmw}: no Fast DDS profile applied'
    chosen = env.get(PROFILE_VARIABLE, '')
    if chosen:
        return f'Fast DDS profile {chosen} (from ${PROFILE_VARIABLE})'
    profile = package_profile()
    if profile is None:
        return (f'Fast DDS defaults: the package profile {_FILENAME} was not found (camera-sized '
                f'frames may be lost; set ${PROFILE_VARIABLE})')
    env[PROFILE_VARIABLE] = str(profile)
    return f'Fast DDS profile {profile} (package default; ${PROFILE_VARIABLE} was not set)'
