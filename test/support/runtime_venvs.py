"""Virtualenvs that stand in for a robot's Python (issue 13): 3.10 with numpy 1.x, as ROS 2 Humble
on a Jetson has, and 3.12, as Jazzy on Ubuntu 24.04 has.

Each holds requirements-runtime.txt (no torch) and the ROS 2 wheels of its requirements-ros-*.txt
here, standing in for the robot's apt-installed ROS. It is built once from the pyenv interpreter
under build/runtime-venvs/<name> and rebuilt when a stamp says the requirements, the interpreter
or the repository's place changed; a file lock makes concurrent pytest processes wait for one
build. The repository goes on the venv's path through a .pth file, as an editable install puts it,
without a build step writing egg-info into the shared tree. Start processes in a venv with
`runtime_env()`: the main venv's ROS libraries must not leak in.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

__all__ = ['BUILD_DIR', 'ROBOT_PYTHONS', 'RUNTIME_REQUIREMENTS', 'RobotPython', 'VenvBuildError',
           'VenvUnavailableError', 'ensure_venv', 'find_interpreter', 'runtime_env']

REPO = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parent
BUILD_DIR = REPO / 'build' / 'runtime-venvs'
RUNTIME_REQUIREMENTS = REPO / 'requirements-runtime.txt'
STAMP = 'malmm-stamp.json'
BUILD_STEPS = 1  # bump when _build changes: every existing venv is rebuilt
DEFAULT_INDEX = 'https://pypi.org/simple'

# What a process in a runtime venv must not inherit. The ROS wheels' bootstrapper re-executes
# Python once with LD_LIBRARY_PATH set to its own venv's libraries and a guard variable set;
# inherited from the main venv, the guard skips that and the other Python's ROS libraries load.
# The others point into another Python or a sourced ROS install.
_NOT_INHERITED = ('_ROS_WHEELS_BOOTSTRAP_COMPLETE', 'LD_LIBRARY_PATH', 'PYTHONPATH', 'PYTHONHOME',
                  'VIRTUAL_ENV', 'AMENT_PREFIX_PATH', 'COLCON_PREFIX_PATH')
# This machine's pip.conf names local indexes that may be missing: pip warns once per package.
_PIP_NOISE = "WARNING: Location 'file:"


class VenvUnavailableError(Exception):
    """This machine cannot build the venv (no interpreter, no package index): tests skip."""


class VenvBuildError(Exception):
    """pip refused our requirements on a reachable index: the project's bug, tests fail."""


@dataclass(frozen=True)
class RobotPython:
    """One robot's Python and the venv standing in for it."""

    version: str  # 'major.minor' of the pyenv interpreter
    ros_requirements: Path  # the ROS 2 wheels standing in for the robot's system ROS
    stands_for: str  # the robot, in words, for progress lines and skip reasons

    @property
    def name(self) -> str:
        return 'py' + self.version.replace('.', '')

    @property
    def venv(self) -> Path:
        return BUILD_DIR / self.name

    @property
    def python(self) -> Path:
        return self.venv / 'bin' / 'python'

    @property
    def requirements(self) -> tuple[Path, ...]:
        return (RUNTIME_REQUIREMENTS, self.ros_requirements)


ROBOT_PYTHONS: dict[str, RobotPython] = {robot.version: robot for robot in (
    RobotPython('3.10', SUPPORT / 'requirements-ros-py310.txt',
                'ROS 2 Humble on a Jetson (JetPack 6): Python 3.10, numpy 1.x'),
    RobotPython('3.12', SUPPORT / 'requirements-ros-py312.txt',
                'ROS 2 Jazzy on Ubuntu 24.04: Python 3.12'),
)}


def runtime_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a process in a runtime venv: this one's without what points into
    another Python, DDS kept on this machine, the repo's DDS settings unless set, then `extra`."""
    env = {key: value for key, value in os.environ.items() if key not in _NOT_INHERITED}
    env['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'  # never DDS traffic off this machine
    env.setdefault('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    env.setdefault('FASTDDS_DEFAULT_PROFILES_FILE', str(REPO / 'config' / 'fastdds.xml'))
    env.update(extra or {})
    return env


def find_interpreter(version: str) -> Path:
    """The newest pyenv CPython `version`.<patch> (VenvUnavailableError saying where it looked)."""
    root = Path(os.environ.get('PYENV_ROOT') or Path.home() / '.pyenv')
    found = []
    for path in root.glob(f'versions/{version}.*/bin/python{version}'):
        patch = path.parents[1].name.removeprefix(f'{version}.')
        if patch.isdigit():  # not 3.10-dev, 3.13.0t and the like
            found.append((int(patch), path))
    if not found:
        raise VenvUnavailableError(f'python{version} not found under pyenv: no '
                                   f'{root}/versions/{version}.<patch>/bin/python{version}')
    return max(found)[1]


def ensure_venv(robot: RobotPython, *, echo: Callable[[str], None] = print,
                verbose: bool = False) -> Path:
    """The python of `robot`'s venv, built first unless its stamp is current.

    `echo` gets progress lines, and pip's output too when `verbose`. Raises
    VenvUnavailableError when this machine cannot build it, VenvBuildError when pip refuses the
    requirements.
    """
    interpreter = find_interpreter(robot.version)
    stamp = _stamp(robot, interpreter)
    if _current(robot, stamp):
        return robot.python
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with (BUILD_DIR / f'{robot.name}.lock').open('w') as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is building it: wait, then look again
            echo(f'waiting for another process building the {robot.name} venv')
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not _current(robot, stamp):
            _build(robot, interpreter, stamp, echo=echo, verbose=verbose)
    return robot.python


def _stamp(robot: RobotPython, interpreter: Path) -> dict[str, object]:
    """What the venv was built from; a venv whose stamp differs is rebuilt."""
    version = subprocess.run([str(interpreter), '-c', 'import sys; print(sys.version)'],
                             capture_output=True, text=True, check=True,
                             env=runtime_env()).stdout.strip()
    digest = hashlib.sha256()
    for path in robot.requirements:
        digest.update(path.read_bytes())
    # The repo's path: the .pth file names it, and a venv does not survive a move.
    return {'steps': BUILD_STEPS, 'interpreter': str(interpreter), 'python': version,
            'requirements_sha256': digest.hexdigest(), 'repo': str(REPO)}


def _current(robot: RobotPython, stamp: dict[str, object]) -> bool:
    try:
        built = json.loads((robot.venv / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return built == stamp and robot.python.exists()


def _build(robot: RobotPython, interpreter: Path, stamp: dict[str, object], *,
           echo: Callable[[str], None], verbose: bool) -> None:
    files = ' + '.join(_shown(path) for path in robot.requirements)
    echo(f'building the {robot.name} venv ({robot.stands_for}) from {interpreter} with {files} '
         f'under {_shown(robot.venv)}: about half a minute, once')
    started = time.monotonic()
    # A half-built venv (a build killed midway) has no stamp: start from nothing.
    shutil.rmtree(robot.venv, ignore_errors=True)
    log_path = BUILD_DIR / f'{robot.name}.log'
    show = echo if verbose else None
    with log_path.open('w') as log:
        code, tail = _run([str(interpreter), '-m', 'venv', str(robot.venv)], log, show)
        if code:
            raise VenvUnavailableError(f'{interpreter} could not create a venv:\n'
                                       + '\n'.join(tail))
        pip = [str(robot.python), '-m', 'pip', 'install', '--disable-pip-version-check',
               '--progress-bar', 'off']
        for path in robot.requirements:
            pip += ['-r', str(path)]
        code, tail = _run(pip, log, show)
    if code:
        _refuse(robot, tail, log_path)
    site = robot.venv / 'lib' / f'python{robot.version}' / 'site-packages'
    (site / 'malmm_ros_repo.pth').write_text(f'{REPO}\n')
    (robot.venv / STAMP).write_text(json.dumps(stamp, indent=1) + '\n')
    echo(f'{robot.name} venv ready in {time.monotonic() - started:.0f} s (log: {log_path})')


def _shown(path: Path) -> str:
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def _run(command: list[str], log: TextIO,
         show: Callable[[str], None] | None) -> tuple[int, list[str]]:
    """Run `command` writing its output to `log` (and `show`); its exit code and last lines."""
    tail: deque[str] = deque(maxlen=20)
    log.write(f'$ {" ".join(command)}\n')
    log.flush()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=runtime_env()) as process:
        for line in process.stdout:
            log.write(line)
            if line.startswith(_PIP_NOISE):
                continue
            tail.append(line.rstrip())
            if show:
                show(line.rstrip())
    return process.returncode, list(tail)


def _refuse(robot: RobotPython, tail: list[str], log_path: Path) -> None:
    """pip failed: skip when the index cannot be reached, fail when it answered and refused."""
    message = (f'pip could not install the {robot.name} requirements:\n' + '\n'.join(tail[-12:])
               + f'\n(whole log: {log_path})')
    index = os.environ.get('PIP_INDEX_URL') or _pip_config(robot, 'global.index-url') \
        or DEFAULT_INDEX
    try:
        urllib.request.urlopen(f'{index.rstrip("/")}/pip/', timeout=15).close()
    except urllib.error.HTTPError:
        pass  # it answered: the index is reachable
    except (OSError, ValueError) as exc:  # URLError, timeouts, a refused connection
        raise VenvUnavailableError(
            f'{message}\npackage index {index} unreachable: {exc}') from None
    raise VenvBuildError(message)


def _pip_config(robot: RobotPython, key: str) -> str:
    result = subprocess.run([str(robot.python), '-m', 'pip', 'config', 'get', key],
                            capture_output=True, text=True, env=runtime_env())
    return result.stdout.strip() if result.returncode == 0 else ''


def main() -> int:
    """Build every robot Python's venv ahead of the tests (`make runtime-venvs`)."""
    for robot in ROBOT_PYTHONS.values():
        try:
            print(f'{robot.name}: {ensure_venv(robot)}')
        except VenvUnavailableError as exc:
            print(f'SKIPPED {robot.name}: {exc}')
        except VenvBuildError as exc:
            print(f'ERROR: {exc}', file=sys.stderr)
            return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
