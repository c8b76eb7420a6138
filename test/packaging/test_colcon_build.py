"""A real `colcon build` of the package: what `ros2 run` and `ros2 launch` will look for.

The package is copied into a fresh workspace so the build never writes into the checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.colcon_ws import PACKAGE, PROBLEM, colcon_build, colcon_missing

pytestmark = pytest.mark.slow  # one real colcon build for the module


@pytest.fixture(scope='module')
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Build once for all checks; returns the install prefix and colcon's output."""
    missing = colcon_missing()
    if missing:
        pytest.skip(missing)
    return colcon_build(tmp_path_factory.mktemp('ws'))


@pytest.mark.parametrize('relative', [
    f'share/{PACKAGE}/package.xml',
    f'share/{PACKAGE}/launch/anticipate.launch.py',
    f'share/{PACKAGE}/launch/cameras.launch.py',
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
