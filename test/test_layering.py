"""The packages of malmm_ros form a DAG in one written-down order (STYLE guideline 11).

A module may import modules of its own layer or of lower layers, never of a higher one; every
import counts, including those inside functions (a lazy upward import is still an upward
dependency). The ROS-free core is everything below `ros`.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'malmm_ros'

# Lowest first. A name is a top-level module or subpackage of malmm_ros.
LAYERS: tuple[tuple[str, ...], ...] = (
    ('__init__', 'errors', 'decode_limits', 'config', 'stamps'),
    ('files', 'imaging', 'labels', 'protocol'),
    ('model',),
    ('data',),
    ('metrics',),
    ('pipeline', 'runtime'),
    ('training',),
    ('evaluation',),
    ('ros',),
    ('cli',),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
# Narrower rules inside the order.
FORBIDDEN = {
    'evaluation': ('malmm_ros.training.loop',),  # scoring must not pull the training loop in
}
ROS_ROOTS = ('rclpy', 'rcl_interfaces', 'sensor_msgs', 'std_msgs', 'std_srvs',
             'diagnostic_msgs', 'builtin_interfaces', 'launch', 'launch_ros', 'cv_bridge')


def _part(module: str) -> str:
    """Layer name of a dotted module inside malmm_ros ('malmm_ros.model.qformer' -> 'model')."""
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else '__init__'


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    relative = path.relative_to(root.parent).with_suffix('')
    parts = list(relative.parts)
    if parts[-1] == '__init__' and len(parts) > 1:
        parts.pop()
    return '.'.join(parts)


def imports_of(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own = _module_name(path, root).split('.')
    package = own if path.name == '__init__.py' else own[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = '.'.join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ''
            found.append((node.lineno, module))
            # `from malmm_ros import x` imports the submodule x
            if module == 'malmm_ros':
                found += [(node.lineno, f'malmm_ros.{a.name}') for a in node.names]
    return found


def violations(root: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(root.rglob('*.py')):
        name = _module_name(path, root)
        layer = _part(name)
        if layer not in RANK:
            out.append(f'{name}: package {layer!r} is not in LAYERS; place it in the order')
            continue
        for line, module in imports_of(path, root):
            if module.split('.')[0] in ROS_ROOTS and RANK[layer] < RANK['ros']:
                out.append(f'{name}:{line} imports {module}: the core below ros is ROS-free')
            if not module.startswith('malmm_ros'):
                continue
            target = _part(module)
            if target in RANK and RANK[target] > RANK[layer]:
                out.append(f'{name}:{line} imports {module}: {layer} is below {target}')
            for banned in FORBIDDEN.get(layer, ()):
                if module == banned or module.startswith(banned + '.'):
                    out.append(f'{name}:{line} imports {module}, which {layer} must not')
    return out


def test_every_import_goes_down_the_order() -> None:
    assert violations() == []


@pytest.mark.parametrize(('where', 'line', 'expected'), [
    ('model/upward.py', 'from malmm_ros.data.epic import read_segments\n', 'model is below data'),
    ('data/upward.py', 'import malmm_ros.ros.anticipate_node\n', 'data is below ros'),
    ('model/lazy.py', 'def f():\n    from malmm_ros.pipeline import Prediction\n',
     'model is below pipeline'),
    ('evaluation/uses_loop.py', 'from malmm_ros.training.loop import train\n',
     'evaluation must not'),
    ('pipeline/ros_inside.py', 'import rclpy\n', 'ROS-free'),
    ('newpkg/mod.py', 'x = 1\n', 'not in LAYERS'),
])
def test_an_upward_import_is_caught(tmp_path: Path, where: str, line: str, expected: str
                                    ) -> None:
    """The checker itself, on a copy of the package with one bad module added."""
    copy = tmp_path / 'malmm_ros'
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns('__pycache__'))
    target = copy / where
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(line)
    found = violations(copy)
    assert found and any(expected in v for v in found), found
