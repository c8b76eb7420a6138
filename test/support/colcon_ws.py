"""A real `colcon build` of the package in a fresh workspace, and environments with setup files
sourced: what `ros2 run` and `ros2 launch` use on a robot.

The package is copied into the workspace so the build never writes into the checkout. Used by
test/packaging/test_colcon_build.py (what the build installs) and test/launch (the launch files
run from that install).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ['COLCON', 'PACKAGE', 'PROBLEM', 'ROOT', 'VENV_BIN', 'BuildError', 'colcon_build',
           'colcon_missing', 'copy_package', 'sourced_env']

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = 'malmm_ros'
VENV_BIN = Path(sys.executable).parent
COLCON = VENV_BIN / 'colcon'
PROBLEM = re.compile(r'\berror\b|Traceback|\bfailed\b|\baborted\b', re.IGNORECASE)
# Fallback when git is unavailable: the ignored paths that matter for a build.
IGNORE = shutil.ignore_patterns('.venv', '.git', 'build', 'install', 'log', '__pycache__',
                                '*.egg-info', '.pytest_cache', '.ruff_cache', 'engines')


class BuildError(AssertionError):
    """colcon build failed; the message holds the tail of its output."""


def colcon_missing() -> str | None:
    """Why colcon cannot run from this interpreter's environment, or None when it can."""
    try:
        import colcon_core  # noqa: F401
        import colcon_ros  # noqa: F401
    except ImportError as exc:
        return f'colcon is not installed ({exc}); pip install colcon-common-extensions'
    if not COLCON.exists():
        return f'no colcon executable next to {sys.executable}'
    return None


def copy_package(dest: Path) -> None:
    """Tracked plus untracked-but-not-ignored files, as a fresh clone with local edits."""
    try:
        listed = subprocess.run(
            ['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
            cwd=ROOT, capture_output=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        shutil.copytree(ROOT, dest, ignore=IGNORE)
        return
    for name in filter(None, listed.decode().split('\0')):
        src = ROOT / name
        if src.is_file():  # tracked files deleted in the work tree are listed too
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)  # keeps the executable bit of scripts/anticipate


def colcon_build(ws: Path, timeout: float = 300.0) -> tuple[Path, str]:
    """Copy the package to `ws`/src and build it there; returns the package's install prefix
    and colcon's output. Raises BuildError (with the output's tail) if the build fails."""
    copy_package(ws / 'src' / PACKAGE)
    env = {
        **os.environ,
        # colcon runs setup.py with the python it finds first: the venv's, not the system's.
        'PATH': f'{VENV_BIN}{os.pathsep}{os.environ.get("PATH", "")}',
        'PYTHONDONTWRITEBYTECODE': '1',
        'COLCON_HOME': str(ws / '.colcon'),  # no user-level defaults or mixins
    }
    env.pop('COLCON_DEFAULTS_FILE', None)
    start = time.monotonic()
    proc = subprocess.run(
        [str(COLCON), 'build', '--base-paths', 'src', '--event-handlers', 'console_direct+'],
        cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)
    output = f'{proc.stdout}\n{proc.stderr}'
    if proc.returncode != 0:
        raise BuildError(f'colcon build failed ({time.monotonic() - start:.1f} s):\n'
                         f'{output[-6000:]}')
    return ws / 'install' / PACKAGE, output


def sourced_env(*scripts: Path, env: Mapping[str, str] | None = None,
                timeout: float = 60.0) -> dict[str, str]:
    """The environment after `source`-ing each bash script in turn over `env` (default: this
    process's), as a shell that ran `source install/local_setup.bash` would have it."""
    command = ' && '.join([*(f'source "${i + 1}"' for i in range(len(scripts))), 'env -0'])
    proc = subprocess.run(['bash', '-c', command, 'bash', *(str(s) for s in scripts)],
                          env=dict(os.environ if env is None else env), capture_output=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f'sourcing {", ".join(map(str, scripts))} failed '
                             f'({proc.returncode}):\n{proc.stderr.decode(errors="replace")}')
    pairs = (entry.split('=', 1) for entry in proc.stdout.decode().split('\0') if '=' in entry)
    # bash's own bookkeeping is not part of what the scripts set.
    return {key: value for key, value in pairs if key not in ('_', 'SHLVL', 'OLDPWD')}
