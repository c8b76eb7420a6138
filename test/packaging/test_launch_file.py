"""Static checks of the launch files, setup.py and package.xml against the node's contract.

The launch files run for real in test/launch (slow, DDS, with launch from ../shared/ros-extras);
these checks need neither: the files are read with `ast`, never imported, and compared with
the config schema the node declares its parameters from.
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from malmm_ros.config import AnticipateConfig

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = 'malmm_ros'
LAUNCH_FILE = ROOT / 'launch' / 'anticipate.launch.py'
CAMERAS_FILE = ROOT / 'launch' / 'cameras.launch.py'
EXECUTABLE = 'anticipate'


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ''


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _call_name(n) == name]


def _kwargs(call: ast.Call) -> dict[str, ast.expr]:
    return {k.arg: k.value for k in call.keywords if k.arg}


def _literal(node: ast.expr | None) -> Any:
    assert node is not None
    return ast.literal_eval(node)


def _functions(tree: ast.Module) -> set[str]:
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


@pytest.fixture(scope='module')
def launch_tree() -> ast.Module:
    return ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))


@pytest.fixture(scope='module')
def node_actions(launch_tree: ast.Module) -> dict[str, ast.Call]:
    """The plain Node and, for managed:=true, the LifecycleNode: one of each."""
    actions = {name: _calls(launch_tree, name) for name in ('Node', 'LifecycleNode')}
    assert all(len(calls) == 1 for calls in actions.values()), actions
    return {name: calls[0] for name, calls in actions.items()}


@pytest.fixture(scope='module')
def node_kwargs(launch_tree: ast.Module, node_actions: dict[str, ast.Call]
                ) -> dict[str, ast.expr]:
    """The keyword arguments both node actions take: one dict `**`-unpacked into each, so the
    plain and the managed node cannot drift apart."""
    unpacked = [{k.value.id for k in call.keywords if k.arg is None
                 and isinstance(k.value, ast.Name)} for call in node_actions.values()]
    assert all(len(names) == 1 for names in unpacked) and unpacked[0] == unpacked[1], unpacked
    (name,) = unpacked[0]
    value = next(n.value for n in ast.walk(launch_tree) if isinstance(n, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == name for t in n.targets))
    assert isinstance(value, ast.Dict)
    return {_literal(key): item for key, item in zip(value.keys, value.values, strict=True)}


@pytest.fixture(scope='module')
def setup_call() -> ast.Call:
    tree = ast.parse((ROOT / 'setup.py').read_text())
    calls = _calls(tree, 'setup')
    assert len(calls) == 1
    return calls[0]


def _data_files(setup_call: ast.Call) -> dict[str, list[str]]:
    """{destination: [source or glob pattern]}, with f'{PACKAGE}' and glob() resolved."""
    out: dict[str, list[str]] = {}
    entries = _kwargs(setup_call)['data_files']
    assert isinstance(entries, ast.List)
    for entry in entries.elts:
        assert isinstance(entry, ast.Tuple) and len(entry.elts) == 2
        dest = _text(entry.elts[0])
        sources = entry.elts[1]
        if isinstance(sources, ast.Call) and _call_name(sources) == 'glob':
            out.setdefault(dest, []).append(_text(sources.args[0]))
        else:
            assert isinstance(sources, ast.List)
            out.setdefault(dest, []).extend(_text(s) for s in sources.elts)
    return out


def _text(node: ast.expr) -> str:
    """A string literal or an f-string over PACKAGE."""
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.FormattedValue):
                assert isinstance(value.value, ast.Name) and value.value.id == 'PACKAGE'
                parts.append(PACKAGE)
            else:
                parts.append(_literal(value))
        return ''.join(parts)
    return _literal(node)


def test_declares_exactly_the_launch_arguments(launch_tree: ast.Module) -> None:
    names = [_literal(c.args[0]) for c in _calls(launch_tree, 'DeclareLaunchArgument')]
    assert sorted(names) == sorted(['image_topic', 'input_transport', 'backend', 'params_file',
                                    'namespace', 'managed', 'autostart'])
    used = {_literal(c.args[0]) for c in _calls(launch_tree, 'LaunchConfiguration')}
    assert used == set(names), 'every declared argument is used, and only those'


def test_argument_defaults_are_valid(launch_tree: ast.Module) -> None:
    defaults = {_literal(c.args[0]): _kwargs(c).get('default_value')
                for c in _calls(launch_tree, 'DeclareLaunchArgument')}
    assert _literal(defaults['image_topic']) == '/camera/image_raw'
    assert _literal(defaults['namespace']) == ''
    assert _literal(defaults['managed']) == _literal(defaults['autostart']) == 'false'
    # The same values the config schema accepts, so the launch defaults match the yaml's.
    config = AnticipateConfig()
    for name in ('input_transport', 'backend'):
        value = _literal(defaults[name])
        assert getattr(config.replace(**{name: value}), name) == value  # ConfigError if invalid
        assert value == getattr(config, name), f'{name}: launch and yaml defaults differ'


def test_default_params_file_is_the_installed_config(launch_tree: ast.Module,
                                                      setup_call: ast.Call) -> None:
    default = next(_kwargs(c)['default_value']
                   for c in _calls(launch_tree, 'DeclareLaunchArgument')
                   if _literal(c.args[0]) == 'params_file')
    assert isinstance(default, ast.Name), 'params_file default should be a variable'
    join = next(n.value for n in ast.walk(launch_tree) if isinstance(n, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == default.id for t in n.targets))
    assert isinstance(join, ast.Call) and _call_name(join) == 'join'
    share, *rest = join.args
    assert isinstance(share, ast.Call) and _call_name(share) == 'get_package_share_directory'
    assert _literal(share.args[0]) == PACKAGE
    assert [_literal(a) for a in rest] == ['config', 'anticipate.yaml']
    assert (ROOT / 'config' / 'anticipate.yaml').is_file()
    assert 'config/*.yaml' in _data_files(setup_call)[f'share/{PACKAGE}/config']


def test_node_runs_the_installed_executable(node_kwargs: dict[str, ast.expr],
                                            setup_call: ast.Call) -> None:
    kwargs = node_kwargs
    assert _literal(kwargs['package']) == PACKAGE
    assert _literal(kwargs['executable']) == EXECUTABLE
    assert _literal(kwargs['name']) == 'malmm_anticipate'
    # `ros2 run` / launch_ros look for <prefix>/lib/<package>/<executable>.
    installed = _data_files(setup_call)[f'lib/{PACKAGE}']
    wrapper = [s for s in installed if Path(s).name == EXECUTABLE]
    assert wrapper == [f'scripts/{EXECUTABLE}']
    path = ROOT / wrapper[0]
    assert path.stat().st_mode & 0o111, f'{path} must be executable (chmod +x)'
    text = path.read_text()
    assert text.startswith('#!/usr/bin/env python3\n')
    assert 'from malmm_ros.ros.anticipate_main import main' in text


def test_console_script_exists(setup_call: ast.Call) -> None:
    entry_points = _literal(_kwargs(setup_call)['entry_points'])
    scripts = dict(s.replace(' ', '').split('=') for s in entry_points['console_scripts'])
    assert scripts['malmm-anticipate'] == 'malmm_ros.ros.anticipate_main:main'
    assert 'malmm-demo' in scripts


def test_managed_selects_the_lifecycle_node(node_actions: dict[str, ast.Call]) -> None:
    """managed:=true starts `anticipate --managed` as a LifecycleNode instead of the Node."""
    plain, managed = (_kwargs(node_actions[name]) for name in ('Node', 'LifecycleNode'))
    for kwargs, condition in ((plain, 'UnlessCondition'), (managed, 'IfCondition')):
        call = kwargs['condition']
        assert isinstance(call, ast.Call) and _call_name(call) == condition
        assert isinstance(call.args[0], ast.Name) and call.args[0].id == 'managed'
    assert 'arguments' not in plain
    assert _literal(managed['arguments']) == ['--managed']
    main = (ROOT / 'malmm_ros' / 'ros' / 'anticipate_main.py').read_text()
    assert "'--managed'" in main, 'the node no longer takes --managed'


def test_parameter_overrides_are_node_parameters(node_kwargs: dict[str, ast.expr]) -> None:
    params = node_kwargs['parameters']
    assert isinstance(params, ast.List) and len(params.elts) == 2
    first, overrides = params.elts
    # The file comes first so the explicit arguments override it.
    assert isinstance(first, ast.Name) and first.id == 'params_file'
    assert isinstance(overrides, ast.Dict)
    names = {_literal(k) for k in overrides.keys if k is not None}
    assert names == {'input_transport', 'backend'}
    assert names <= set(AnticipateConfig().to_parameters())


def test_remaps_the_image_topics(node_kwargs: dict[str, ast.expr]) -> None:
    kwargs = node_kwargs
    remaps = kwargs['remappings']
    assert isinstance(remaps, ast.List)
    sources = [_literal(pair.elts[0]) for pair in remaps.elts if isinstance(pair, ast.Tuple)]
    # One remap: the compressed input is `<image>/compressed` (image_transport's convention).
    assert sources == ['image'], 'the node subscribes to `image` (relative)'
    assert isinstance(kwargs['namespace'], ast.Name)
    assert _literal(kwargs['output']) == 'screen'


@pytest.mark.parametrize('path', [LAUNCH_FILE, CAMERAS_FILE], ids=lambda p: p.name)
def test_launch_file_is_installed(setup_call: ast.Call, path: Path) -> None:
    assert 'launch/*.launch.py' in _data_files(setup_call)[f'share/{PACKAGE}/launch']
    assert path.name.endswith('.launch.py') and path.is_file()
    assert _functions(ast.parse(path.read_text())) >= {'generate_launch_description'}


def test_cameras_file_defines_only_its_own_argument(launch_tree: ast.Module) -> None:
    """cameras.launch.py includes anticipate.launch.py per camera and declares its arguments
    from that file (one definition each): the only literal declaration is `cameras`, and the
    ones it sets per camera are anticipate's."""
    tree = ast.parse(CAMERAS_FILE.read_text())
    literal = [c.args[0] for c in _calls(tree, 'DeclareLaunchArgument')
               if isinstance(c.args[0], ast.Constant)]
    assert [_literal(name) for name in literal] == ['cameras']
    per_camera = next(_literal(n.value) for n in tree.body if isinstance(n, ast.Assign)
                      and any(isinstance(t, ast.Name) and t.id == 'PER_CAMERA'
                              for t in n.targets))
    declared = {_literal(c.args[0]) for c in _calls(launch_tree, 'DeclareLaunchArgument')}
    assert set(per_camera) == {'namespace', 'image_topic'} and set(per_camera) <= declared
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    assert LAUNCH_FILE.name in strings, 'cameras.launch.py must include anticipate.launch.py'
    assert not _calls(tree, 'Node'), 'nodes come from anticipate.launch.py only'


def test_package_xml() -> None:
    root = ET.parse(ROOT / 'package.xml').getroot()
    assert root.tag == 'package' and root.get('format') == '3'
    assert root.findtext('name') == PACKAGE
    assert root.findtext('export/build_type') == 'ament_python'
    exec_depends = {e.text for e in root.findall('exec_depend')}
    assert {'rclpy', 'sensor_msgs', 'std_msgs', 'std_srvs', 'diagnostic_msgs'} <= exec_depends
    setup_version = _literal(_kwargs(_calls(ast.parse((ROOT / 'setup.py').read_text()),
                                            'setup')[0])['version'])
    assert root.findtext('version') == setup_version
