"""Tests of safetensors checkpoints: round trips, architecture checks and every refusal."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from malmm_ros.config import AnticipateConfig, LabelsConfig, ModelConfig
from malmm_ros.errors import CheckpointError, DataError
from malmm_ros.labels import LabelMaps
from malmm_ros.model.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_is_trained,
    load_checkpoint,
    load_text_projector,
    read_checkpoint_metadata,
    save_checkpoint,
    save_untrained_checkpoint,
    untrained_model,
)
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.model.memory import MemorySpec
from malmm_ros.model.text import TextProjector

CONFIG = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64,
                     encoder_width=24, value_decays=4)  # heads of 8 channels: 4 of them decays
LABELS = LabelMaps.placeholder(5, 7).with_actions([(0, 1), (2, 3)])
FEATURE_DIM, NUM_TOKENS = 40, 6


def _model(seed: int = 0) -> MalmmModel:
    torch.manual_seed(seed)
    model = MalmmModel(CONFIG, LABELS, feature_dim=FEATURE_DIM, num_tokens=NUM_TOKENS)
    with torch.no_grad():  # make every tensor distinctive, time-bias tables included
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def _stream_outputs(model: MalmmModel, steps: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    memory = model.new_memory(MemorySpec(3))
    outputs = []
    with torch.no_grad():
        for step in range(steps):
            tokens = torch.randn(1, NUM_TOKENS, FEATURE_DIM, generator=gen)
            logits = model.classify(model.step(tokens, 0.7 * step, memory))
            outputs.extend(t for t in logits if t is not None)
    return outputs


@pytest.fixture(scope='module')
def model() -> MalmmModel:
    return _model()


@pytest.fixture(scope='module')
def saved(model: MalmmModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp('ckpt') / 'model.safetensors'
    assert save_checkpoint(path, model, training={'epochs': 3}) == path
    return path


def _raw(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework='pt') as handle:
        return handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


# -- round trip -------------------------------------------------------------------------------


def test_round_trip_state_config_labels(model: MalmmModel, saved: Path) -> None:
    loaded = load_checkpoint(saved)
    assert not loaded.training
    assert loaded.config == CONFIG
    assert loaded.config.architecture() == model.config.architecture()
    assert loaded.labels == LABELS
    assert [a.id for a in loaded.labels.actions] == [1, 2003]
    assert (loaded.feature_dim, loaded.num_tokens) == (FEATURE_DIM, NUM_TOKENS)
    original, restored = model.state_dict(), loaded.state_dict()
    assert list(restored) == list(original)
    for name, tensor in original.items():
        assert torch.equal(restored[name], tensor), name


def test_round_trip_gives_identical_outputs(model: MalmmModel, saved: Path) -> None:
    loaded = load_checkpoint(saved, CONFIG)
    expected, got = _stream_outputs(model), _stream_outputs(loaded)
    assert len(got) == 18  # verb, noun and action logits at every step
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(expected[0], expected[-3])  # the stream does move the outputs


def test_metadata_contents(saved: Path) -> None:
    metadata = read_checkpoint_metadata(saved)
    assert metadata['format'] == CHECKPOINT_FORMAT == 'malmm_ros/checkpoint/v1'
    assert metadata['model'] == {'preset': 'edge', **CONFIG.architecture()}
    assert metadata['training'] == {'epochs': 3}
    assert LabelMaps.from_dict(metadata['labels']) == LABELS


def test_load_keeps_runtime_switches(saved: Path) -> None:
    config = ModelConfig(**{**CONFIG.architecture(), 'recompute_projections': True})
    assert load_checkpoint(saved, config).config.recompute_projections is True


def test_save_replaces_existing_file_without_leftovers(model: MalmmModel, tmp_path: Path) -> None:
    path = tmp_path / 'm.safetensors'
    path.write_bytes(b'old contents')
    save_checkpoint(path, model)
    assert load_checkpoint(path).labels == LABELS
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m.safetensors']


def test_file_is_safetensors_not_pickle(saved: Path) -> None:
    data = saved.read_bytes()
    (header_len,) = struct.unpack('<Q', data[:8])
    assert 2 <= header_len < len(data) - 8
    assert data[8:9] == b'{'
    header = json.loads(data[8:8 + header_len])
    assert json.loads(header['__metadata__']['malmm_ros'])['format'] == CHECKPOINT_FORMAT
    assert not data.startswith(b'\x80') and b'PK\x03\x04' not in data[:4]
    ends = [entry['data_offsets'][1] for key, entry in header.items() if key != '__metadata__']
    assert 8 + header_len + max(ends) == len(data)


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ('changes', 'field', 'config_value', 'stored_value'),
    [
        ({'num_layers': 3}, 'num_layers', 3, 2),
        ({'hidden_size': 64}, 'hidden_size', 64, 32),
        ({'encoder_width': 48}, 'encoder_width', 48, 24),
        ({'max_age_s': 60.0}, 'max_age_s', 60.0, 600.0),
    ],
)
def test_architecture_mismatch(saved: Path, changes: dict, field: str, config_value: object,
                               stored_value: object) -> None:
    config = ModelConfig(**{**CONFIG.architecture(), **changes})
    message = rf'{field}: config {config_value!r} vs checkpoint {stored_value!r}'
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(saved, config)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match='does not exist'):
        load_checkpoint(tmp_path / 'absent.safetensors')


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match='does not exist'):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize('kind', ['random', 'pickle', 'truncated', 'empty'])
def test_not_a_safetensors_file(tmp_path: Path, saved: Path, kind: str) -> None:
    path = tmp_path / 'bad.safetensors'
    if kind == 'random':
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                       generator=torch.Generator().manual_seed(0)).numpy()
                         .tobytes())
    elif kind == 'pickle':
        torch.save(_model().state_dict(), path)
    elif kind == 'truncated':
        path.write_bytes(saved.read_bytes()[:200])
    else:
        path.write_bytes(b'')
    with pytest.raises(CheckpointError, match='not a readable safetensors file'):
        load_checkpoint(path)


def test_safetensors_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / 'plain.safetensors'
    save_file({'w': torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match='has no malmm_ros metadata'):
        load_checkpoint(path)
    save_file({'w': torch.zeros(2)}, str(path), metadata={'other': 'x'})
    with pytest.raises(CheckpointError, match='has no malmm_ros metadata'):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ('header', 'message'),
    [
        ('{"format": "malmm_ros/checkpoint/v0"}', "format 'malmm_ros/checkpoint/v0'"),
        ('{"model": {}}', 'format None'),
        ('[1, 2]', "format 'list'"),
        ('{"format": ', 'metadata is not valid JSON'),
        ('not json', 'metadata is not valid JSON'),
    ],
)
def test_bad_metadata(tmp_path: Path, header: str, message: str) -> None:
    path = tmp_path / 'meta.safetensors'
    save_file({'w': torch.zeros(2)}, str(path), metadata={'malmm_ros': header})
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ('edit', 'message'),
    [
        (lambda m: m.pop('model'), 'no "model" section'),
        (lambda m: m['model'].update(num_heads=5), 'bad metadata.*model.hidden_size'),
        (lambda m: m['model'].update(preset='huge'), 'bad metadata.*huge'),
        (lambda m: m['model'].update(bogus=1), 'bad metadata'),
        (lambda m: m.update(labels={'verbs': []}), 'bad metadata.*labels'),
    ],
)
def test_bad_metadata_fields(tmp_path: Path, saved: Path, edit, message: str) -> None:
    header, tensors = _raw(saved)
    metadata = json.loads(header['malmm_ros'])
    edit(metadata)
    path = tmp_path / 'edited.safetensors'
    save_file(tensors, str(path), metadata={'malmm_ros': json.dumps(metadata)})
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ('edit', 'message'),
    [
        (lambda t: t.pop('heads.action.weight'), r"missing \['heads.action.weight'\]"),
        (lambda t: t.pop('qformer.layers.1.feed_forward.dense_out.bias'),
         'missing.*qformer.layers.1.feed_forward.dense_out.bias'),
        (lambda t: t.update({'qformer.query_tokens': t['qformer.query_tokens'][:, :16]}),
         r'wrong shapes.*qformer.query_tokens \(1, 16, 32\) vs \(1, 32, 32\)'),
        (lambda t: t.update({'adapter.proj.weight': t['adapter.proj.weight'].T.contiguous()}),
         r'wrong shapes.*adapter.proj.weight \(40, 24\) vs \(24, 40\)'),
        (lambda t: t.update({'extra.weight': torch.zeros(3)}), r"unexpected \['extra.weight'\]"),
    ],
    ids=['missing-head', 'missing-layer', 'shape-queries', 'shape-adapter', 'unexpected'],
)
def test_tensors_do_not_fit(tmp_path: Path, saved: Path, edit, message: str) -> None:
    header, tensors = _raw(saved)
    edit(tensors)
    path = tmp_path / 'edited.safetensors'
    save_file(tensors, str(path), metadata=header)
    with pytest.raises(CheckpointError, match=rf'does not fit its model: .*{message}'):
        load_checkpoint(path)


# Regression: malformed feature_dim / num_tokens metadata must be a CheckpointError naming
# the field, not a ValueError, TypeError or RuntimeError from building the model.
@pytest.mark.parametrize(
    ('field', 'value'),
    [('feature_dim', 'wide'), ('feature_dim', None), ('feature_dim', -3), ('num_tokens', 'x')],
)
def test_bad_feature_metadata(tmp_path: Path, saved: Path, field: str, value: object) -> None:
    header, tensors = _raw(saved)
    metadata = json.loads(header['malmm_ros'])
    metadata[field] = value
    path = tmp_path / 'edited.safetensors'
    save_file(tensors, str(path), metadata={'malmm_ros': json.dumps(metadata)})
    with pytest.raises(CheckpointError, match=field):
        load_checkpoint(path)


# -- non-finite weights -----------------------------------------------------------------------


def _poisoned(path: Path, values: dict[str, tuple[slice, float]], *,
              projector: TextProjector | None = None) -> Path:
    """A real checkpoint of _model() with `values[name] = (where, value)` written into it."""
    model = _model()
    with torch.no_grad():
        state = model.state_dict()
        for name, (where, value) in values.items():
            state[name].view(-1)[where] = value
    return save_checkpoint(path, model, training={'epochs': 3}, text_projector=projector)


@pytest.mark.parametrize(
    ('values', 'name', 'count'),
    [
        ({'adapter.proj.weight': (slice(None), float('nan'))}, 'adapter.proj.weight', 960),
        ({'qformer.layers.1.feed_forward.dense_out.bias': (slice(3, 6), float('inf'))},
         'qformer.layers.1.feed_forward.dense_out.bias', 3),
        ({'heads.verb.bias': (slice(0, 1), float('-inf'))}, 'heads.verb.bias', 1),
        # Two bad tensors: the first by name is named.
        ({'qformer.query_tokens': (slice(0, 2), float('nan')),
          'heads.noun.weight': (slice(0, 7), float('inf'))}, 'heads.noun.weight', 7),
    ],
    ids=['all-nan', 'some-inf', 'minus-inf', 'two-tensors'],
)
def test_non_finite_tensor_is_refused(tmp_path: Path, values: dict, name: str,
                                      count: int) -> None:
    path = _poisoned(tmp_path / 'bad.safetensors', values)
    message = f'checkpoint {path}: tensor {name} has {count} NaN/inf values'
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(path, CONFIG)


def test_finite_checkpoint_still_loads_after_the_check(tmp_path: Path) -> None:
    # Huge but finite values are legal weights; only NaN and inf are refused.
    path = _poisoned(tmp_path / 'big.safetensors', {'adapter.proj.bias': (slice(0, 2), 3e38)})
    loaded = load_checkpoint(path)
    assert loaded.state_dict()['adapter.proj.bias'][:2].tolist() == pytest.approx([3e38] * 2)


def test_non_finite_text_projector_is_refused(tmp_path: Path) -> None:
    projector = TextProjector.untrained(CONFIG.hidden_size, 16, llm_name='tiny', prompt='next?')
    with torch.no_grad():
        projector.proj.weight[0, :4] = float('nan')
    path = _poisoned(tmp_path / 'text.safetensors', {}, projector=projector)
    with pytest.raises(CheckpointError, match=re.escape(
            f'checkpoint {path}: tensor text_projector.proj.weight has 4 NaN/inf values')):
        load_text_projector(path)
    assert load_checkpoint(path).labels == LABELS  # the main model's weights are fine


# -- untrained checkpoints ----------------------------------------------------------------------


UNTRAINED_CONFIG = AnticipateConfig(model=CONFIG, memory_bank_length=7, sample_fps=2.0)


def test_untrained_checkpoint_round_trip(tmp_path: Path) -> None:
    path = save_untrained_checkpoint(tmp_path / 'u.safetensors', UNTRAINED_CONFIG)
    assert checkpoint_is_trained(path) is False
    assert read_checkpoint_metadata(path)['training'] == {
        'untrained': True, 'seed': 0, 'memory_bank_length': 7, 'sample_fps': 2.0}
    loaded = load_checkpoint(path, CONFIG)
    expected = untrained_model(UNTRAINED_CONFIG)
    assert loaded.labels == expected.labels
    assert loaded.labels.num_verbs == 97 and loaded.labels.num_nouns == 300  # placeholders
    for name, tensor in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_untrained_model_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(42)
    before = torch.rand(3)
    torch.manual_seed(42)
    first = untrained_model(UNTRAINED_CONFIG)
    assert torch.equal(torch.rand(3), before)  # the caller's stream did not move
    torch.manual_seed(7)
    second = untrained_model(UNTRAINED_CONFIG)
    assert not first.training
    for name, tensor in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor), name


def test_untrained_model_takes_the_configured_class_csvs(tmp_path: Path) -> None:
    for kind, names in (('verb', ('take', 'put')), ('noun', ('tap', 'spoon', 'plate'))):
        rows = ''.join(f'{i},{n},"[\'{n}\']",{n}\n' for i, n in enumerate(names))
        (tmp_path / f'{kind}s.csv').write_text('id,key,instances,category\n' + rows)
    config = AnticipateConfig(model=CONFIG, labels=LabelsConfig(
        verb_classes=str(tmp_path / 'verbs.csv'), noun_classes=str(tmp_path / 'nouns.csv')))
    labels = untrained_model(config).labels
    assert [c.name for c in labels.verbs] == ['take', 'put']
    assert [c.name for c in labels.nouns] == ['tap', 'spoon', 'plate']
    bad = AnticipateConfig(model=CONFIG, labels=LabelsConfig(
        verb_classes=str(tmp_path / 'absent.csv')))
    with pytest.raises(DataError, match='absent.csv'):
        untrained_model(bad)


def test_every_other_checkpoint_counts_as_trained(saved: Path, tmp_path: Path) -> None:
    assert checkpoint_is_trained(saved) is True  # training {'epochs': 3}
    model = load_checkpoint(saved)
    for training in (None, {'untrained': False}, {'untrained': 'yes'}):
        path = save_checkpoint(tmp_path / 'c.safetensors', model, training=training)
        assert checkpoint_is_trained(path) is True, training
    with pytest.raises(CheckpointError, match='does not exist'):
        checkpoint_is_trained(tmp_path / 'absent.safetensors')


# -- checkpoints from before the age code (time_features), the order bias (order_bias) and ----
# -- the value decays (value_decays) ----------------------------------------------------------


def _older_format(directory: Path, absent: dict[str, Any], **present: Any
                  ) -> tuple[Path, MalmmModel]:
    """A checkpoint as written before the keys of `absent` existed: the model ran with those
    values (0 / False; the first decay layout), and the header has no trace of them."""
    old_config = ModelConfig(**{**CONFIG.architecture(), **absent, **present})
    torch.manual_seed(5)
    model = MalmmModel(old_config, LABELS, feature_dim=FEATURE_DIM, num_tokens=NUM_TOKENS).eval()
    path = directory / 'old.safetensors'
    save_checkpoint(path, model)
    metadata, tensors = _raw(path)
    header = json.loads(metadata['malmm_ros'])
    for name in absent:
        del header['model'][name]
    save_file(tensors, str(path), metadata={'malmm_ros': json.dumps(header)})
    assert any('.decay_out.' in name for name in tensors) == (old_config.decay_channels == 'extra'
                                                             and old_config.value_decays > 0)
    return path, model


@pytest.fixture(scope='module')
def old_format(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MalmmModel]:
    """Before all three: the age-bucket bias only."""
    path, model = _older_format(tmp_path_factory.mktemp('old'),
                                {'time_features': 0, 'order_bias': False, 'value_decays': 0})
    tensors = _raw(path)[1]
    assert not any('.age.' in name or '.order_bias.' in name for name in tensors)
    return path, model


@pytest.fixture(scope='module')
def age_code_format(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MalmmModel]:
    """With the age code, before the order bias."""
    return _older_format(tmp_path_factory.mktemp('age'),
                         {'order_bias': False, 'value_decays': 0}, time_features=16)


@pytest.fixture(scope='module')
def order_format(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MalmmModel]:
    """With the order bias, before the value decays."""
    return _older_format(tmp_path_factory.mktemp('order'), {'value_decays': 0})


@pytest.fixture(scope='module')
def extra_decays_format(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MalmmModel]:
    """With the value decays after each head's value channels, before decay_channels."""
    return _older_format(tmp_path_factory.mktemp('extra'), {'decay_channels': 'extra'})


@pytest.mark.parametrize('fixture,ran_with', [
    ('old_format', {'time_features': 0, 'order_bias': False, 'value_decays': 0}),
    ('age_code_format', {'time_features': 16, 'order_bias': False, 'value_decays': 0}),
    ('order_format', {'time_features': 0, 'order_bias': True, 'value_decays': 0}),
    ('extra_decays_format', {'order_bias': True, 'value_decays': 4, 'decay_channels': 'extra'}),
])
def test_older_formats_load_as_they_ran(fixture: str, ran_with: dict[str, Any],
                                        request: pytest.FixtureRequest) -> None:
    """Each older format loads with the settings it ran with and gives the same outputs."""
    path, model = request.getfixturevalue(fixture)
    loaded = load_checkpoint(path)
    assert {name: getattr(loaded.config, name) for name in ran_with} == ran_with
    assert all((layer.cross_attention.decay_out is None) == (fixture != 'extra_decays_format')
               for layer in loaded.qformer.layers if layer.cross_attention is not None)
    for ours, theirs in zip(_stream_outputs(loaded), _stream_outputs(model), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


_OLDER_HINT = 'it was trained with an older time encoding: set {} to run it'


@pytest.mark.parametrize('fixture,config,message', [
    ('old_format', {}, 'order_bias: config True vs checkpoint False; value_decays: config 4 vs '
     'checkpoint 0; ' + _OLDER_HINT.format('model.order_bias: false, model.value_decays: 0')),
    # With the age code asked for too, every setting is named.
    ('old_format', {'time_features': 16},
     'time_features: config 16 vs checkpoint 0; order_bias: config True vs checkpoint False; '
     'value_decays: config 4 vs checkpoint 0; ' + _OLDER_HINT.format(
         'model.time_features: 0, model.order_bias: false, model.value_decays: 0')),
    ('age_code_format', {'time_features': 16},
     'order_bias: config True vs checkpoint False; value_decays: config 4 vs checkpoint 0; '
     + _OLDER_HINT.format('model.order_bias: false, model.value_decays: 0')),
    ('order_format', {},
     'value_decays: config 4 vs checkpoint 0; ' + _OLDER_HINT.format('model.value_decays: 0')),
    ('extra_decays_format', {},
     "decay_channels: config 'shared' vs checkpoint 'extra'; "
     + _OLDER_HINT.format('model.decay_channels: extra')),
])
def test_older_format_against_a_newer_config_says_why(fixture: str, config: dict[str, Any],
                                                      message: str,
                                                      request: pytest.FixtureRequest) -> None:
    path, _ = request.getfixturevalue(fixture)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(path, ModelConfig(**{**CONFIG.architecture(), **config}))


def test_extra_decays_format_loads_with_its_layout(
        extra_decays_format: tuple[Path, MalmmModel]) -> None:
    path, _ = extra_decays_format
    loaded = load_checkpoint(path, ModelConfig(**{**CONFIG.architecture(),
                                                  'decay_channels': 'extra'}))
    assert loaded.config.decay_channels == 'extra'


def test_without_decays_the_decay_layout_does_not_matter(
        order_format: tuple[Path, MalmmModel]) -> None:
    path, _ = order_format
    for layout in ('shared', 'extra'):
        config = ModelConfig(**{**CONFIG.architecture(), 'value_decays': 0,
                                'decay_channels': layout})
        assert load_checkpoint(path, config).config.decay_channels == layout
