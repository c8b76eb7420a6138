"""The core (model, pipeline, data, runtime, config) must import and run without ROS 2."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'malmm_ros'
ROS_ADAPTER = PACKAGE / 'ros'
ROS_MODULES = ('rclpy', 'rosidl_runtime_py', 'sensor_msgs', 'std_msgs', 'cv_bridge')

IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
names = ['malmm_ros', 'malmm_ros.config', 'malmm_ros.errors', 'malmm_ros.metrics',
         'malmm_ros.model', 'malmm_ros.pipeline', 'malmm_ros.data', 'malmm_ros.runtime',
         'malmm_ros.training', 'malmm_ros.evaluation']
for package in ('malmm_ros.model', 'malmm_ros.pipeline', 'malmm_ros.data', 'malmm_ros.runtime',
                'malmm_ros.training', 'malmm_ros.evaluation'):
    module = importlib.import_module(package)
    names += [f'{package}.{info.name}' for info in pkgutil.iter_modules(module.__path__)]
for name in names:
    importlib.import_module(name)
print(len(names))
print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ROOTS)))
"""


def _import_everything() -> str:
    return IMPORT_EVERYTHING.replace('ROOTS', repr(set(ROS_MODULES)))


def _core_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob('*.py') if ROS_ADAPTER not in p.parents)


@pytest.mark.slow  # imports the whole core in a fresh process
def test_core_imports_without_ros() -> None:
    result = subprocess.run(
        [sys.executable, '-c', _import_everything()],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    count, ros = (result.stdout.splitlines() + [''])[:2]
    assert int(count) >= 15  # the model package alone holds eight modules
    assert ros == '', f'ROS modules imported by the core: {ros}'


@pytest.mark.slow  # imports the whole core in a fresh process
def test_core_imports_even_when_ros_is_unimportable() -> None:
    """With rclpy made unimportable, the core still imports (it never tries)."""
    blocker = (
        'import sys\n'
        'class Block:\n'
        '    def find_spec(self, name, path=None, target=None):\n'
        f'        if name.split(".")[0] in {set(ROS_MODULES)!r}:\n'
        '            raise ImportError(f"blocked {name}")\n'
        'sys.meta_path.insert(0, Block())\n'
    )
    code = blocker + _import_everything()
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('path', _core_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_ros_import_in_core_file(path: Path) -> None:
    text = path.read_text(encoding='utf-8')
    lines = [n for n, line in enumerate(text.splitlines(), 1)
             if re.match(r'\s*(import\s+rclpy|from\s+rclpy)\b', line)]
    assert lines == [], f'{path} imports rclpy on line(s) {lines}'
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.Import):
            roots = {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots = {node.module.split('.')[0]}
        else:
            continue
        assert not roots & set(ROS_MODULES), f'{path}:{node.lineno} imports {roots}'


def test_core_file_list_is_not_empty() -> None:
    names = {p.relative_to(PACKAGE).as_posix() for p in _core_files()}
    assert {'config.py', 'model/qformer.py', 'pipeline/anticipation.py'} <= names
