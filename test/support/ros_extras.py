"""`launch` and `launch_ros` for the tests: ../shared/ros-extras installed into this venv.

They are not on PyPI; ../shared/ros-extras has the upstream wheels and builds the interface
package launch_ros imports (composition_interfaces) with colcon into build/ros-extras. The
install runs once per test session: a file lock makes parallel pytest workers and concurrent
sessions wait for one another, and a stamp under build/ lets the later ones skip install.sh.
Where ../shared/ros-extras is missing, or this machine cannot compile the interface package
(no cmake or compiler), the tests that need it skip; any other failure fails them.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.colcon_ws import sourced_env

__all__ = ['EXTRAS', 'PREFIX', 'ros_extras_env']

ROOT = Path(__file__).resolve().parents[2]
EXTRAS = ROOT.parent / 'shared' / 'ros-extras'
INSTALL_SH = EXTRAS / 'install.sh'
PREFIX = ROOT / 'build' / 'ros-extras'
LOCK = ROOT / 'build' / 'ros-extras.lock'
STAMP = ROOT / 'build' / 'ros-extras.stamp'
SETUP = PREFIX / 'install' / 'local_setup.bash'
BUILT = PREFIX / 'install' / 'composition_interfaces' / 'share' / 'composition_interfaces' / \
    'package.xml'
# What install.sh prints (or leaves in its colcon log) when the machine has no toolchain.
NO_TOOLCHAIN = ('cmake: command not found', 'cmake: not found', 'No CMAKE_C_COMPILER',
                'No CMAKE_CXX_COMPILER', 'CMAKE_C_COMPILER not set', 'CMAKE_CXX_COMPILER not set',
                'is not a full path and was not found in the PATH')
INSTALL_TIMEOUT_S = 900.0  # the colcon build is ~15-40 s alone, minutes on a busy machine


def _session_key() -> str:
    """What the stamp must match: this venv and the exact ros-extras being installed. A new
    pytest session (another parent pid) runs install.sh again, cheaply, as a re-check."""
    digest = hashlib.sha256(INSTALL_SH.read_bytes())
    for wheel in sorted((EXTRAS / 'wheels').glob('*.whl')):
        digest.update(wheel.name.encode())
    session = os.environ.get('PYTEST_XDIST_TESTRUNUID') or str(os.getpid())
    return json.dumps({'venv': sys.prefix, 'extras': digest.hexdigest(), 'session': session})


def _installed(key: str) -> bool:
    try:
        stamp = STAMP.read_text()
    except OSError:
        return False
    return stamp == key and BUILT.is_file() and SETUP.is_file() and \
        importlib.util.find_spec('launch_ros') is not None


def _toolchain_missing() -> str | None:
    if shutil.which('cmake') is None:
        return 'cmake'
    if not any(shutil.which(cc) for cc in ('c++', 'g++', 'clang++')):
        return 'a C++ compiler'
    return None


def _install(key: str) -> None:
    """Run install.sh (the caller holds the lock); skip or fail as the module docstring says."""
    if not BUILT.is_file():
        missing = _toolchain_missing()
        if missing:
            pytest.skip(f'{INSTALL_SH} needs {missing} to build composition_interfaces')
    start = time.monotonic()
    proc = subprocess.run(['bash', str(INSTALL_SH), sys.prefix, str(PREFIX)], cwd=ROOT,
                          capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    if proc.returncode != 0:
        log = PREFIX / 'build.log'
        output = proc.stdout + proc.stderr + (log.read_text(errors='replace')
                                              if log.is_file() else '')
        if any(sign in output for sign in NO_TOOLCHAIN):
            pytest.skip(f'{INSTALL_SH} cannot build composition_interfaces here (no cmake or '
                        f'compiler):\n{output[-1500:]}')
        pytest.fail(f'{INSTALL_SH} {sys.prefix} {PREFIX} failed with {proc.returncode} after '
                    f'{time.monotonic() - start:.0f} s:\n{output[-4000:]}', pytrace=False)
    STAMP.write_text(key)
    # This interpreter may have looked for launch_ros before the wheels were there.
    importlib.invalidate_caches()


def ros_extras_env() -> dict[str, str]:
    """This process's environment with build/ros-extras/install/local_setup.bash sourced (the
    composition_interfaces install); installs ros-extras first if this session has not."""
    if not INSTALL_SH.is_file():
        pytest.skip(f'{EXTRAS} is absent: launch/launch_ros are not on PyPI, nothing to install '
                    'them from (a machine with ROS 2 installed has them)')
    key = _session_key()
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also on skip/fail
        if not _installed(key):
            _install(key)
    return sourced_env(SETUP)
