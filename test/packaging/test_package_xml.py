"""package.xml against what the code imports: `rosdep install --from-paths src` on a ROS machine
installs what it names, so every ROS package a shipped module or launch file imports must be
there, and the Python dependencies with rosdep keys must be named by those keys.
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What a ROS install provides as packages (an import of one of these is a ROS dependency).
ROS_SUFFIXES = ('_msgs', '_srvs', '_interfaces')
ROS_PACKAGES = {'rclpy', 'launch', 'launch_ros', 'ament_index_python'}
# Python modules -> their rosdep keys (keys that resolve on Ubuntu for Humble to Kilted).
# Packages imported through another: rclpy.lifecycle loads lifecycle_msgs, which a ROS install
# does not always pull in with rclpy.
INDIRECT = {'lifecycle_msgs': 'rclpy.lifecycle'}
ROSDEP_KEYS = {'numpy': 'python3-numpy', 'yaml': 'python3-yaml', 'cv2': 'python3-opencv',
               'tqdm': 'python3-tqdm', 'matplotlib': 'python3-matplotlib'}


def _imports(paths: list[Path]) -> set[str]:
    """Top-level module names imported anywhere in `paths` (lazy imports inside functions too)."""
    found: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split('.')[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split('.')[0])
    return found


def _shipped_sources() -> list[Path]:
    return sorted((ROOT / 'malmm_ros').rglob('*.py')) + sorted((ROOT / 'launch').glob('*.py'))


def _depends(tag: str) -> set[str]:
    root = ET.parse(ROOT / 'package.xml').getroot()
    return {element.text.strip() for element in root.findall(tag) if element.text}


def test_every_imported_ros_package_is_an_exec_depend() -> None:
    imported = {name for name in _imports(_shipped_sources())
                if name in ROS_PACKAGES or name.endswith(ROS_SUFFIXES)}
    assert {'rclpy', 'diagnostic_msgs', 'launch', 'launch_ros'} <= imported  # the scan works
    missing = imported - _depends('exec_depend') - _depends('depend')
    assert not missing, f'package.xml lacks <exec_depend> for {sorted(missing)}'


def test_ros_packages_the_tests_use_are_declared() -> None:
    imported = {name for name in _imports(sorted((ROOT / 'test').rglob('*.py')))
                if name in ROS_PACKAGES or name.endswith(ROS_SUFFIXES)}
    declared = _depends('exec_depend') | _depends('test_depend') | _depends('depend')
    assert not imported - declared, sorted(imported - declared)


def test_python_dependencies_use_their_rosdep_keys() -> None:
    imported = _imports(_shipped_sources())
    wanted = {key for module, key in ROSDEP_KEYS.items() if module in imported}
    assert {'python3-numpy', 'python3-yaml', 'python3-opencv'} <= wanted
    missing = wanted - _depends('exec_depend') - _depends('depend')
    assert not missing, f'package.xml lacks <exec_depend> for {sorted(missing)}'


def test_declared_ros_packages_are_used() -> None:
    """No stale entry: each ROS exec_depend is imported by a shipped module or launch file."""
    imported = _imports(_shipped_sources())
    declared = {name for name in _depends('exec_depend') if not name.startswith('python3-')}
    sources = '\n'.join(path.read_text() for path in _shipped_sources())
    imported |= {name for name, via in INDIRECT.items() if f'from {via} import' in sources}
    assert not declared - imported, f'declared but never imported: {sorted(declared - imported)}'


def test_requirements_name_the_pip_only_dependencies() -> None:
    """What rosdep cannot install is in the runtime requirements the README points to."""
    runtime = (ROOT / 'requirements-runtime.txt').read_text()
    for name in ('onnxruntime', 'simplejpeg', 'numpy', 'opencv-python-headless'):
        assert name in runtime, f'requirements-runtime.txt lacks {name}'
    assert 'requirements-runtime.txt' in (ROOT / 'README.md').read_text()
