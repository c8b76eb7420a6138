"""Tests of the configuration schema: the shipped YAML, parsing, validation and round trips."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from malmm_ros.config import AnticipateConfig, LabelsConfig, ModelConfig, load_config
from malmm_ros.errors import ConfigError
from malmm_ros.training.config import load_train_config

REPO = Path(__file__).resolve().parents[1]
YAML_PATH = REPO / 'config' / 'anticipate.yaml'


def _flat_keys(data: dict, prefix: str = '') -> set[str]:
    """Dotted names of every leaf, written independently of malmm_ros.config.flatten."""
    keys = set()
    for key, value in data.items():
        if isinstance(value, dict):
            keys |= _flat_keys(value, f'{prefix}{key}.')
        else:
            keys.add(f'{prefix}{key}')
    return keys


@pytest.fixture(scope='module')
def ros_parameters() -> dict:
    data = yaml.safe_load(YAML_PATH.read_text())
    assert list(data) == ['/**']
    return data['/**']['ros__parameters']


# -- the shipped parameter file ---------------------------------------------------------------


def test_yaml_loads_and_equals_defaults() -> None:
    config = load_config(YAML_PATH)
    assert config == AnticipateConfig()
    assert load_config(str(YAML_PATH)) == AnticipateConfig()


def test_yaml_holds_exactly_the_parameters(ros_parameters: dict) -> None:
    in_yaml = _flat_keys(ros_parameters)
    in_code = set(AnticipateConfig().to_parameters())
    assert in_code - in_yaml == set(), 'parameters missing from config/anticipate.yaml'
    assert in_yaml - in_code == set(), 'unknown parameters in config/anticipate.yaml'


def test_yaml_values_equal_defaults(ros_parameters: dict) -> None:
    defaults = AnticipateConfig().to_parameters()
    flat = {}
    for key in _flat_keys(ros_parameters):
        node = ros_parameters
        for part in key.split('.'):
            node = node[part]
        flat[key] = node
    assert flat == defaults


@pytest.mark.parametrize(
    'key', ['sample_fps', 'publish_every_n', 'memory_bank_length', 'backend', 'checkpoint']
)
def test_required_top_level_keys(ros_parameters: dict, key: str) -> None:
    assert key in ros_parameters
    assert not isinstance(ros_parameters[key], dict)


def test_load_config_none_and_passthrough() -> None:
    assert load_config() == AnticipateConfig()
    config = AnticipateConfig(sample_fps=2.0)
    assert load_config(config) is config
    assert load_config({'sample_fps': 2.0}) == config


# -- from_dict --------------------------------------------------------------------------------


def test_nested_and_dotted_keys_are_equivalent() -> None:
    nested = AnticipateConfig.from_dict(
        {'sample_fps': 4, 'model': {'num_layers': 2, 'hidden_size': 64},
         'labels': {'verb_classes': 'v.csv'}}
    )
    dotted = AnticipateConfig.from_dict(
        {'sample_fps': 4.0, 'model.num_layers': 2, 'model.hidden_size': 64,
         'labels.verb_classes': 'v.csv'}
    )
    assert nested == dotted
    assert nested.sample_fps == 4.0 and isinstance(nested.sample_fps, float)
    assert nested.model.num_layers == 2 and nested.model.hidden_size == 64
    assert nested.model.intermediate_size == ModelConfig().intermediate_size
    assert nested.labels == LabelsConfig(verb_classes='v.csv')


@pytest.mark.parametrize('node', ['/**', 'malmm_node', '/malmm/anticipation'])
def test_ros_parameters_wrapper(node: str) -> None:
    inner = {'publish_every_n': 3, 'model': {'num_queries': 8}}
    wrapped = AnticipateConfig.from_dict({node: {'ros__parameters': inner}})
    assert wrapped == AnticipateConfig.from_dict(inner)
    assert wrapped.publish_every_n == 3 and wrapped.model.num_queries == 8


def test_wrapper_with_two_nodes_is_refused() -> None:
    data = {'/a': {'ros__parameters': {}}, '/b': {'ros__parameters': {}}}
    with pytest.raises(ConfigError, match='more than one node'):
        AnticipateConfig.from_dict(data)


def test_edge_and_base_presets() -> None:
    edge = AnticipateConfig().model
    assert edge.preset == 'edge'
    assert (edge.num_layers, edge.hidden_size, edge.intermediate_size) == (2, 128, 512)
    assert (edge.num_queries, edge.encoder_width, edge.cross_attention_layers()) == (32, 128, (0,))
    base = AnticipateConfig.from_dict({'model': {'preset': 'base'}}).model
    assert (base.num_layers, base.hidden_size, base.intermediate_size) == (4, 256, 1024)
    assert (base.encoder_width, base.cross_attention_layers()) == (256, (0, 2))


def test_blip2_preset() -> None:
    model = AnticipateConfig.from_dict({'model': {'preset': 'blip2'}}).model
    assert model.preset == 'blip2'
    assert (model.num_layers, model.hidden_size, model.num_heads) == (12, 768, 12)
    assert (model.intermediate_size, model.encoder_width) == (3072, 1408)
    assert model.cross_attention_layers() == (0, 2, 4, 6, 8, 10)
    assert model.decay_channels == 'extra'  # BLIP-2's value projections keep every channel


def test_decays_sharing_the_heads_need_wider_heads() -> None:
    assert AnticipateConfig().model.decay_channels == 'shared'
    with pytest.raises(ConfigError, match=r'model.value_decays \(8\) must be below the head '
                                          r'width \(8\) with model.decay_channels: shared'):
        AnticipateConfig.from_dict({'model': {'hidden_size': 32, 'num_heads': 4}})
    for fits in ({'value_decays': 7}, {'decay_channels': 'extra'}, {'value_decays': 0}):
        AnticipateConfig.from_dict({'model': {'hidden_size': 32, 'num_heads': 4, **fits}})
    with pytest.raises(ConfigError, match='decay_channels'):
        AnticipateConfig.from_dict({'model': {'decay_channels': 'inside'}})


def test_overrides_apply_on_top_of_preset() -> None:
    model = AnticipateConfig.from_dict(
        {'model.preset': 'blip2', 'model.num_layers': 2, 'model.num_queries': 16}
    ).model
    assert (model.num_layers, model.num_queries) == (2, 16)
    assert (model.hidden_size, model.num_heads, model.encoder_width) == (768, 12, 1408)


def test_yaml_with_preset_and_override(tmp_path: Path) -> None:
    path = tmp_path / 'p.yaml'
    path.write_text('/**:\n  ros__parameters:\n    model:\n      preset: blip2\n'
                    '      num_layers: 3\n    max_gap_s: 5\n')
    config = load_config(path)
    assert config.model.num_layers == 3 and config.model.hidden_size == 768
    assert config.max_gap_s == 5.0 and isinstance(config.max_gap_s, float)


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ('data', 'field'),
    [
        ({'frobnicate': 1}, 'frobnicate'),
        ({'model': {'typo': 1}}, 'model.typo'),
        ({'labels.verb_csv': 'x'}, 'labels.verb_csv'),
        ({'memory_bank_length': '20'}, 'memory_bank_length'),
        ({'publish_every_n': True}, 'publish_every_n'),
        ({'memory_bank_length': 2.5}, 'memory_bank_length'),
        ({'model': {'num_layers': 'four'}}, 'model.num_layers'),
        ({'sample_fps': 'fast'}, 'sample_fps'),
        ({'model': {'recompute_projections': 1}}, 'model.recompute_projections'),
        ({'checkpoint': 3}, 'checkpoint'),
        ({'memory_bank_length': 0}, 'memory_bank_length'),
        ({'sample_fps': -1}, 'sample_fps'),
        ({'sample_fps': float('nan')}, 'sample_fps'),
        ({'max_gap_s': float('inf')}, 'max_gap_s'),
        ({'publish_every_n': 0}, 'publish_every_n'),
        ({'model': {'num_layers': 0}}, 'model.num_layers'),
        ({'backend': 'foo'}, 'backend'),
        ({'device': 'tpu'}, 'device'),
        ({'model': {'preset': 'huge'}}, 'model.preset'),
        ({'model': {'preset': 3}}, 'model.preset'),
        ({'model': {'hidden_size': 100, 'num_heads': 3}}, 'model.hidden_size'),
    ],
)
def test_bad_values_name_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        AnticipateConfig.from_dict(data)


def test_bad_value_in_yaml_names_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / 'bad.yaml'
    path.write_text('/**:\n  ros__parameters:\n    memory_bank_length: 0\n')
    with pytest.raises(ConfigError, match=rf'{re.escape(str(path))}.*memory_bank_length'):
        load_config(path)


@pytest.mark.parametrize(
    ('text', 'message'),
    [
        ('/**:\n  ros__parameters:\n    sample_fps: [1\n', 'not valid YAML'),
        ('- 1\n- 2\n', 'expected a mapping'),
        ('just a string\n', 'expected a mapping'),
        ('', 'expected a mapping'),
    ],
)
def test_bad_yaml_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / 'config.yaml'
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize('text', ['1e-4', '1e1'])
def test_both_files_read_exponents_as_floats(tmp_path: Path, text: str) -> None:
    """YAML 1.1 reads 1e1 and 1e-4 (no dot) as strings; the node's file and the training file
    read them as floats, as ROS 2 does, through the one loader."""
    node = tmp_path / 'anticipate.yaml'
    node.write_text(f'/**:\n  ros__parameters:\n    max_gap_s: {text}\n    sample_fps: {text}\n')
    config = load_config(node)
    assert config.max_gap_s == config.sample_fps == float(text)
    train = tmp_path / 'train.yaml'
    train.write_text(f'optim:\n  weight_decay: {text}\ndata:\n  tau_a: {text}\n')
    training = load_train_config(train)
    assert training.optim.weight_decay == training.data.tau_a == float(text)
    node.write_text(f'/**:\n  ros__parameters:\n    max_gap_s: "{text}"\n')
    with pytest.raises(ConfigError, match='max_gap_s must be of type float'):
        load_config(node)  # quoted: a string, as in any YAML


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / 'nope.yaml'
    with pytest.raises(ConfigError, match=rf'cannot read config {re.escape(str(path))}'):
        load_config(path)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError, match='model.num_heads'):
        ModelConfig(hidden_size=64, num_heads=5)
    with pytest.raises(ConfigError, match='memory_bank_length'):
        AnticipateConfig().replace(memory_bank_length=0)


# Regression: replace() must type-check like a parameter file, with a ConfigError
# naming the field (not a bare TypeError, and no silent float/bool for an int).
@pytest.mark.parametrize(
    ('changes', 'field'),
    [
        ({'sample_fps': '2'}, 'sample_fps'),
        ({'memory_bank_length': 2.5}, 'memory_bank_length'),
        ({'publish_every_n': True}, 'publish_every_n'),
    ],
)
def test_replace_checks_types(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        AnticipateConfig().replace(**changes)


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'config',
    [
        AnticipateConfig(),
        AnticipateConfig.from_dict(
            {'sample_fps': 0, 'publish_every_n': 7, 'memory_bank_length': 3, 'backend': 'auto',
             'checkpoint': '/tmp/x.safetensors', 'max_gap_s': 0,
             'model': {'preset': 'blip2', 'num_layers': 2, 'recompute_projections': True,
                       'max_age_s': 30},
             'labels': {'verb_classes': 'v.csv', 'noun_classes': 'n.csv'}}
        ),
    ],
    ids=['defaults', 'custom'],
)
def test_parameters_round_trip(config: AnticipateConfig, tmp_path: Path) -> None:
    params = config.to_parameters()
    assert all('.' not in k or k.split('.')[0] in ('model', 'labels', 'qos', 'text')
               for k in params)
    assert AnticipateConfig.from_dict(params) == config
    assert AnticipateConfig.from_dict(config.to_dict()) == config
    path = tmp_path / 'round.yaml'
    path.write_text(yaml.safe_dump({'/**': {'ros__parameters': config.to_dict()}}))
    assert load_config(path) == config
