"""Node parameters from the one config schema (malmm_ros.config): declare, read, validate.

Every field of AnticipateConfig becomes a parameter of the same dotted name, with its
description and range in the descriptor, so `ros2 param describe` shows what the YAML says.
"""

from __future__ import annotations

import difflib
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node

from malmm_ros.config import AnticipateConfig, field_specs
from malmm_ros.errors import ConfigError

__all__ = ['READ_ONLY', 'config_from_parameters', 'declare_config_parameters',
           'refuse_unknown_parameters']

# Changing these needs a new subscription; refuse them at run time (restart the node instead).
READ_ONLY = frozenset({'input_transport', 'qos.reliability', 'qos.depth'})


def _descriptor(name: str, spec: Any, value: Any) -> ParameterDescriptor:
    meta = spec.metadata
    text = meta.get('doc', '')
    if meta.get('choices'):
        text += f' (one of: {", ".join(meta["choices"])})'
    # Float fields take any number: YAML and `-p x:=2` give integers for whole numbers, and
    # rclpy would refuse an INTEGER for a DOUBLE parameter; the config coerces and checks it.
    descriptor = ParameterDescriptor(description=text, read_only=False,
                                     dynamic_typing=isinstance(value, float))
    lo, hi = meta.get('range', (None, None))
    if isinstance(value, bool) or lo is None or hi is None:
        return descriptor
    if isinstance(value, int):
        descriptor.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=0)]
    elif isinstance(value, float):
        descriptor.floating_point_range = [FloatingPointRange(
            from_value=float(lo), to_value=float(hi), step=0.0)]
    return descriptor


def declare_config_parameters(node: Node, defaults: AnticipateConfig | None = None
                              ) -> AnticipateConfig:
    """Declare every config field on `node` and return the validated config it now holds.

    Values come from the defaults overridden by --params-file / -p; an invalid value raises
    ConfigError naming the parameter, its valid range and the value.
    """
    defaults = defaults or AnticipateConfig()
    specs = field_specs()
    for name, value in defaults.to_parameters().items():
        try:
            node.declare_parameter(name, value, _descriptor(name, specs[name], value))
        except Exception as exc:  # rclpy raises several types for a bad override
            raise ConfigError(f'parameter {name}: {exc}') from None
    return config_from_parameters(node)


def config_from_parameters(node: Node, changes: dict[str, Any] | None = None
                           ) -> AnticipateConfig:
    """The config the node's parameters describe, with optional pending `changes` applied."""
    try:
        values = {name: node.get_parameter(name).value for name in field_specs()}
    except Exception as exc:  # a parameter whose declaration failed (the managed node)
        raise ConfigError(f'parameters incomplete: {exc}') from None
    values.update(changes or {})
    return AnticipateConfig.from_dict(values, source='parameters')


# Parameters rclpy declares itself, besides `qos_overrides.*`.
_ROS_PARAMETERS = frozenset({'use_sim_time', 'start_type_description_service'})


def refuse_unknown_parameters(node: Node) -> None:
    """ConfigError for names given by --params-file or -p that no declared parameter has,
    with the closest valid name.

    rclpy keeps overrides for undeclared names and silently ignores them, so a typo would run
    the node on defaults. (`_parameter_overrides` is rclpy's only record of them.)
    """
    declared = set(node._parameters) | _ROS_PARAMETERS
    names = sorted(name for name in getattr(node, '_parameter_overrides', {})
                   if name not in declared and not name.startswith('qos_overrides.'))
    if not names:
        return
    unknown = []
    for name in names:
        close = difflib.get_close_matches(name, field_specs(), n=1)
        unknown.append(f'{name}; did you mean {close[0]}?' if close else name)
    raise ConfigError('unknown parameter ' + '; unknown parameter '.join(unknown))
