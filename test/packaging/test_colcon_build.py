"""A real `colcon build` of the package: what `ros2 run` and `ros2 launch` will look for.

The package is copied into a fresh workspace so the build never writes into the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = 'malmm_ros'
VENV_BIN = Path(sys.executable).parent
COLCON = VENV_BIN / 'colcon'
PROBLEM = re.compile(r'\berror\b|Traceback|\bfailed\b|\baborted\b', re.IGNORECASE)
# Fallback when git is unavailable: the ignored paths that matter for a build.
IGNORE = shutil.ignore_patterns('.venv', '.git', 'build', 'install', 'log', '__pycache__',
                                '*.egg-info', '.pytest_cache', '.ruff_cache', 'engines')
pytestmark = pytest.mark.slow  # one real colcon build for the module


def _copy_package(dest: Path) -> None:
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


@pytest.fixture(scope='module')
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Build once for all checks; returns the install prefix and colcon's output."""
    try:
        import colcon_core  # noqa: F401
        import colcon_ros  # noqa: F401
    except ImportError as exc:
        pytest.skip(f'colcon is not installed ({exc}); pip install colcon-common-extensions')
    if not COLCON.exists():
        pytest.skip(f'no colcon executable next to {sys.executable}')
    ws = tmp_path_factory.mktemp('ws')
    _copy_package(ws / 'src' / PACKAGE)
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
        cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    output = f'{proc.stdout}\n{proc.stderr}'
    assert proc.returncode == 0, f'colcon build failed ({time.monotonic() - start:.1f} s):\n' \
        f'{output[-6000:]}'
    return ws / 'install' / PACKAGE, output


@pytest.mark.parametrize('relative', [
    f'share/{PACKAGE}/package.xml',
    f'share/{PACKAGE}/launch/anticipate.launch.py',
    f'share/{PACKAGE}/config/anticipate.yaml',
    f'share/ament_index/resource_index/packages/{PACKAGE}',
])
def test_installs_share_files(built: tuple[Path, str], relative: str) -> None:
    prefix, _ = built
    assert (prefix / relative).is_file(), f'{relative} missing under {prefix}'


def test_installs_ros2_run_executable(built: tuple[Path, str]) -> None:
    prefix, _ = built
    exe = prefix / 'lib' / PACKAGE / 'anticipate'
    assert exe.is_file(), f'{exe} missing: `ros2 run {PACKAGE} anticipate` would not find it'
    assert os.access(exe, os.X_OK), f'{exe} is not executable'
    assert exe.read_text().startswith('#!'), 'the wrapper needs a shebang line'


def test_installs_python_package(built: tuple[Path, str]) -> None:
    prefix, _ = built
    found = list(prefix.glob(f'lib/python3*/site-packages/{PACKAGE}/config.py'))
    assert found, f'{PACKAGE} python package not installed under {prefix}'


def test_build_log_has_no_error(built: tuple[Path, str]) -> None:
    prefix, output = built
    # Word match: `copying malmm_ros/errors.py` is not an error.
    lines = [line for line in output.splitlines() if PROBLEM.search(line)]
    assert not lines, 'colcon output mentions errors:\n' + '\n'.join(lines[:20])
    summary = [line for line in output.splitlines() if line.startswith('Summary:')]
    assert summary and '1 package finished' in summary[-1], summary
    logs = prefix.parents[1] / 'log' / 'latest_build'
    for name in ('events.log', f'{PACKAGE}/stderr.log'):
        path = logs / name
        if path.is_file():
            assert 'Traceback' not in path.read_text(), f'{path} has a traceback'
