"""Node parameters declared from the config schema (malmm_ros.ros.parameters), with rclpy."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import rclpy
from rcl_interfaces.msg import ParameterType
from rclpy.context import Context
from rclpy.node import Node
from rclpy.parameter import Parameter

from malmm_ros.config import AnticipateConfig
from malmm_ros.errors import ConfigError
from malmm_ros.ros.parameters import (
    READ_ONLY,
    config_from_parameters,
    declare_config_parameters,
    field_specs,
)
from support.domains import domain_id

ENV = {'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST', 'ROS_DOMAIN_ID': str(domain_id(__file__))}


def _leaf_fields(cls: type = AnticipateConfig, prefix: str = '') -> dict[str, Any]:
    """The schema's leaves, walked here independently: nested dataclass defaults recurse."""
    leaves: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            leaves.update(_leaf_fields(f.default_factory, f'{prefix}{f.name}.'))
        else:
            leaves[prefix + f.name] = f
    return leaves


LEAVES = _leaf_fields()
DEFAULTS = AnticipateConfig().to_parameters()


def _ranged(kind: type) -> list[str]:
    return sorted(name for name, f in LEAVES.items()
                  if f.type == kind.__name__ and f.metadata['range'] != (None, None))


@pytest.fixture(scope='module')
def context() -> Iterator[Context]:
    saved = {key: os.environ.get(key) for key in ENV}
    os.environ.update(ENV)
    ctx = Context()
    rclpy.init(context=ctx)
    try:
        yield ctx
    finally:
        rclpy.shutdown(context=ctx)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def make_node(context: Context) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def make(overrides: dict[str, Any] | None = None) -> Node:
        node = rclpy.create_node('param_test', context=context, parameter_overrides=[
            Parameter(name, value=value) for name, value in (overrides or {}).items()])
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.destroy_node()


# -- field_specs ---------------------------------------------------------------------------


def test_field_specs_lists_every_leaf_field() -> None:
    specs = field_specs()
    assert set(specs) == set(LEAVES) == set(DEFAULTS)
    assert {name: spec.name for name, spec in specs.items()} == \
        {name: name.rsplit('.', 1)[-1] for name in LEAVES}
    assert {'model.num_layers', 'qos.depth', 'labels.verb_classes', 'sample_fps'} <= set(specs)
    assert not {'model', 'qos', 'labels'} & set(specs)


def test_field_specs_carry_the_schema_metadata() -> None:
    for name, spec in field_specs().items():
        assert spec.metadata == LEAVES[name].metadata, name
        assert spec.metadata['doc'], f'{name} has no documentation'


def test_read_only_parameters() -> None:
    assert frozenset({'input_transport', 'qos.reliability', 'qos.depth'}) == READ_ONLY
    assert set(READ_ONLY) <= set(DEFAULTS)


# -- declare -------------------------------------------------------------------------------


def test_declares_exactly_the_config_keys_with_defaults(make_node: Callable[..., Node]) -> None:
    node = make_node()
    before = set(node.get_parameters_by_prefix(''))
    config = declare_config_parameters(node)
    assert config == AnticipateConfig()
    assert set(node.get_parameters_by_prefix('')) - before == set(DEFAULTS)
    values = {name: node.get_parameter(name).value for name in DEFAULTS}
    assert values == DEFAULTS


@pytest.mark.parametrize('name', sorted(DEFAULTS))
def test_parameter_type_follows_the_default(make_node: Callable[..., Node], name: str) -> None:
    node = make_node()
    declare_config_parameters(node)
    expected = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
                float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING}
    assert node.get_parameter(name).type_.value == expected[type(DEFAULTS[name])]


@pytest.mark.parametrize('name', sorted(DEFAULTS))
def test_descriptor_has_description_and_range(make_node: Callable[..., Node],
                                              name: str) -> None:
    node = make_node()
    declare_config_parameters(node)
    descriptor = node.describe_parameter(name)
    meta = LEAVES[name].metadata
    assert descriptor.description.strip()
    assert meta['doc'] in descriptor.description
    for choice in meta['choices'] or ():
        assert choice in descriptor.description
    lo, hi = meta['range']
    if lo is None:
        assert list(descriptor.integer_range) == [] and list(descriptor.floating_point_range) == []
    elif isinstance(DEFAULTS[name], int):
        [bounds] = descriptor.integer_range
        assert (bounds.from_value, bounds.to_value) == (lo, hi)
        assert list(descriptor.floating_point_range) == []
    else:
        [bounds] = descriptor.floating_point_range
        assert (bounds.from_value, bounds.to_value) == (lo, hi)
        assert list(descriptor.integer_range) == []
    assert not descriptor.read_only


def test_every_numeric_field_with_a_range_gets_one(make_node: Callable[..., Node]) -> None:
    node = make_node()
    declare_config_parameters(node)
    ints = {n for n in DEFAULTS if len(node.describe_parameter(n).integer_range)}
    floats = {n for n in DEFAULTS if len(node.describe_parameter(n).floating_point_range)}
    assert ints == set(_ranged(int))
    assert floats == set(_ranged(float))
    assert {'memory_bank_length', 'model.num_layers', 'qos.depth'} <= ints
    assert {'sample_fps', 'max_gap_s', 'model.max_age_s'} <= floats


def test_overrides_are_applied(make_node: Callable[..., Node]) -> None:
    node = make_node({'memory_bank_length': 7, 'model.num_layers': 5,
                             'qos.reliability': 'reliable', 'sample_fps': 2.5,
                             'model.recompute_projections': True})
    config = declare_config_parameters(node)
    assert config.memory_bank_length == 7
    assert config.model.num_layers == 5
    assert config.qos.reliability == 'reliable'
    assert config.sample_fps == 2.5
    assert config.model.recompute_projections is True
    assert node.get_parameter('memory_bank_length').value == 7
    assert node.get_parameter('model.num_layers').value == 5
    assert config.model.hidden_size == AnticipateConfig().model.hidden_size  # untouched


def test_custom_defaults_are_declared(make_node: Callable[..., Node]) -> None:
    node = make_node({'model.num_layers': 3})
    defaults = AnticipateConfig(memory_bank_length=9, device='cuda')
    config = declare_config_parameters(node, defaults)
    assert node.get_parameter('memory_bank_length').value == 9
    assert (config.memory_bank_length, config.device, config.model.num_layers) == (9, 'cuda', 3)


@pytest.mark.parametrize('name', _ranged(int) + _ranged(float))
def test_range_ends_are_accepted(make_node: Callable[..., Node], name: str) -> None:
    lo, hi = LEAVES[name].metadata['range']
    cast = int if isinstance(DEFAULTS[name], int) else float
    for value in (cast(lo), cast(hi)):
        if name == 'model.num_heads' and AnticipateConfig().model.hidden_size % value:
            continue  # a valid range end that the default hidden_size cannot split into
        overrides = {name: value}
        model = {'hidden_size': DEFAULTS['model.hidden_size'],
                 'num_heads': DEFAULTS['model.num_heads'],
                 'value_decays': DEFAULTS['model.value_decays'], name.split('.')[-1]: value}
        if model['value_decays'] >= model['hidden_size'] // model['num_heads']:
            # Decays sharing the heads' value channels need heads wider than them; after them
            # (extra) any count fits.
            overrides['model.decay_channels'] = 'extra'
        node = make_node(overrides)
        config = declare_config_parameters(node)
        assert node.get_parameter(name).value == value
        assert config.to_parameters()[name] == value


@pytest.mark.parametrize('name', _ranged(int) + _ranged(float))
@pytest.mark.parametrize('side', ['below', 'above'])
def test_out_of_range_override_names_the_parameter(make_node: Callable[..., Node], name: str,
                                                   side: str) -> None:
    lo, hi = LEAVES[name].metadata['range']
    if isinstance(DEFAULTS[name], int):
        value: int | float = int(lo) - 1 if side == 'below' else int(hi) + 1
    else:
        value = float(lo) - 0.5 if side == 'below' else float(hi) * 1.5 + 1.0
    node = make_node({name: value})
    with pytest.raises(ConfigError, match=rf'parameter {name}:.*out of range'):
        declare_config_parameters(node)


@pytest.mark.parametrize(('name', 'value'), [
    ('backend', 'nope'), ('device', 'tpu'), ('input_transport', 'udp'),
    ('qos.reliability', 'sometimes'), ('model.preset', 'huge'),
])
def test_bad_choice_raises(make_node: Callable[..., Node], name: str, value: str) -> None:
    node = make_node({name: value})
    with pytest.raises(ConfigError, match=rf"{name}.*'{value}'"):
        declare_config_parameters(node)


@pytest.mark.parametrize(('name', 'value'), [
    ('memory_bank_length', 'many'), ('model.recompute_projections', 1),
    ('backend', 3), ('sample_fps', 'fast'),
])
def test_wrong_type_override_raises(make_node: Callable[..., Node], name: str,
                                    value: Any) -> None:
    node = make_node({name: value})
    # rclpy refuses a wrong type for a statically typed parameter ("parameter NAME: ..."); float
    # parameters are dynamically typed and the config refuses it ("NAME must be of type float").
    with pytest.raises(ConfigError, match=rf'{re.escape(name)}(:| must be of type)'):
        declare_config_parameters(node)


def test_inconsistent_overrides_raise(make_node: Callable[..., Node]) -> None:
    node = make_node({'model.num_heads': 3})
    with pytest.raises(ConfigError, match=r'model.hidden_size \(128\) must be divisible by '
                                          r'model.num_heads \(3\)'):
        declare_config_parameters(node)


def test_nan_override_is_refused(make_node: Callable[..., Node]) -> None:
    node = make_node({'max_gap_s': float('nan')})
    with pytest.raises(ConfigError, match='max_gap_s'):
        declare_config_parameters(node)


# Regression: YAML and `-p x:=2` give integers for whole numbers; float parameters must
# accept them (the config stores them as floats).
@pytest.mark.parametrize(('name', 'value'), [('sample_fps', 2), ('max_gap_s', 10)])
def test_integer_override_of_a_float_parameter_is_accepted(make_node: Callable[..., Node],
                                                           name: str, value: int) -> None:
    node = make_node({name: value})
    config = declare_config_parameters(node)
    assert config.to_parameters()[name] == float(value)


# -- config_from_parameters ----------------------------------------------------------------


@pytest.fixture
def declared(make_node: Callable[..., Node]) -> Node:
    node = make_node({'memory_bank_length': 7})
    declare_config_parameters(node)
    return node


def test_config_from_parameters_without_changes(declared: Node) -> None:
    assert config_from_parameters(declared) == AnticipateConfig(memory_bank_length=7)
    assert config_from_parameters(declared, {}) == config_from_parameters(declared)


def test_changes_are_applied_without_touching_the_node(declared: Node) -> None:
    config = config_from_parameters(declared, {'memory_bank_length': 5, 'model.num_layers': 6,
                                               'device': 'cuda'})
    assert (config.memory_bank_length, config.model.num_layers, config.device) == (5, 6, 'cuda')
    assert declared.get_parameter('memory_bank_length').value == 7
    assert config_from_parameters(declared).memory_bank_length == 7


def test_changes_follow_later_set_parameters(declared: Node) -> None:
    result = declared.set_parameters([Parameter('publish_every_n', value=4)])
    assert result[0].successful
    assert config_from_parameters(declared).publish_every_n == 4


def test_integer_change_of_a_float_field_becomes_float(declared: Node) -> None:
    config = config_from_parameters(declared, {'sample_fps': 3})
    assert config.sample_fps == 3.0 and isinstance(config.sample_fps, float)


@pytest.mark.parametrize(('changes', 'message'), [
    ({'memory_bank_length': 0}, r'memory_bank_length must be in \[1, 1000\], got 0'),
    ({'model.num_layers': 49}, r'model.num_layers must be in \[1, 48\], got 49'),
    ({'sample_fps': -1.0}, r'sample_fps must be in'),
    ({'backend': 'nope'}, r"backend must be one of \[.*'torch'.*\], got 'nope'"),
    ({'qos.depth': 'deep'}, r'qos.depth must be of type int'),
    ({'model.num_heads': 5}, r'must be divisible by model.num_heads \(5\)'),
    ({'no_such_parameter': 1}, r'unknown parameter\(s\) no_such_parameter'),
])
def test_bad_changes_raise(declared: Node, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_parameters(declared, changes)
