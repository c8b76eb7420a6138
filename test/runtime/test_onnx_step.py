"""The exported step graphs with the numpy memory (runtime onnx) against the torch model's
cached step, over streams long enough to compress many times, for every layout the graphs
carry: decays shared inside the heads or after them, no decays, no order bias, action head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from malmm_ros.config import model_preset
from malmm_ros.errors import CheckpointError, ConfigError
from malmm_ros.labels import LabelMaps
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.model.memory import MemorySpec
from malmm_ros.runtime.onnx_step import OnnxStep
from malmm_ros.runtime.step_export import export_step, step_spec
from malmm_ros.runtime.step_spec import StepSpec

SMALL = {'num_layers': 3, 'hidden_size': 32, 'num_heads': 4, 'intermediate_size': 48,
         'num_queries': 6, 'encoder_width': 24, 'cross_attention_every': 2, 'value_decays': 4}
FEATURES, TOKENS, CAPACITY = 16, 7, 3

LAYOUTS = {
    'shared decays': {},
    'extra decays': {'decay_channels': 'extra'},
    'no decays, no order': {'value_decays': 0, 'order_bias': False},
    'one layer, action head': {'num_layers': 1, 'cross_attention_every': 1},
}


def _model(overrides: dict, seed: int = 0) -> MalmmModel:
    labels = LabelMaps.placeholder(num_verbs=5, num_nouns=7)
    if overrides.get('num_layers') == 1:
        labels = labels.with_actions([(0, 1), (2, 3), (4, 6), (1, 1)])
    torch.manual_seed(seed)
    model = MalmmModel(model_preset('edge', **{**SMALL, **overrides}), labels,
                       feature_dim=FEATURES, num_tokens=TOKENS).eval()
    with torch.no_grad():  # biases and decay readers away from their starts: all must matter
        for layer in model.qformer.layers:
            for attention in (layer.self_attention, layer.cross_attention):
                if attention is not None:
                    attention.time_bias.table.normal_(0.0, 1.0)
                    if attention.decay_out is not None:
                        attention.decay_out.weight.normal_(0.0, 0.3)
    return model


def _stream(count: int, seed: int) -> list[tuple[np.ndarray, float]]:
    rng = np.random.default_rng(seed)
    now, out = 0.0, []
    for index in range(count):
        now += float(rng.choice([0.25, 1.0, 3.0, -0.1])) + (40.0 if index == count // 2 else 0)
        out.append((rng.standard_normal((1, TOKENS, FEATURES)).astype(np.float32), now))
    return out


@pytest.fixture(scope='module', params=list(LAYOUTS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[MalmmModel, Path, Path, StepSpec]:
    model = _model(LAYOUTS[request.param])
    folder = tmp_path_factory.mktemp('step')
    spec = export_step(model, folder / 'projection.onnx', folder / 'step.onnx',
                       capacity=CAPACITY)
    return model, folder / 'projection.onnx', folder / 'step.onnx', spec


@pytest.mark.slow
def test_graphs_follow_the_torch_step(exported: tuple) -> None:
    """Every step's query outputs and probabilities, and the banks at the end."""
    model, projection, step, spec = exported
    runner = OnnxStep(projection, step, spec, CAPACITY, threads=1)
    memory = model.new_memory(MemorySpec(CAPACITY))
    for tokens, now in _stream(30, seed=1):
        with torch.inference_mode():
            queries = model.step(torch.from_numpy(tokens), now, memory)
            logits = model.classify(queries)
        runner.step(tokens, now)
        np.testing.assert_allclose(runner.queries, queries.numpy(), atol=2e-5)
        verb, noun, action = runner.probabilities()
        np.testing.assert_allclose(verb, logits.verb.softmax(-1)[0].numpy(), atol=2e-6)
        np.testing.assert_allclose(noun, logits.noun.softmax(-1)[0].numpy(), atol=2e-6)
        if logits.action is None:
            assert action is None
        else:
            np.testing.assert_allclose(action, logits.action.softmax(-1)[0].numpy(),
                                       atol=2e-6)
    visual = runner.memory.visual
    assert visual.compressions == memory.visual.compressions == 30 - CAPACITY
    positions = np.arange(TOKENS)[None]
    ordered = visual.data['tokens'][0, 0][visual.order[0, :len(visual)], positions]
    np.testing.assert_allclose(ordered, memory.visual.tokens[0].numpy(), atol=2e-5)
    assert runner.memory.frames_seen == memory.frames_seen == 30


@pytest.mark.slow
def test_reset_starts_the_stream_over(exported: tuple) -> None:
    model, projection, step, spec = exported
    runner = OnnxStep(projection, step, spec, CAPACITY, threads=1)
    stream = _stream(6, seed=2)
    first = [runner.step(tokens, now).copy() for tokens, now in stream]
    runner.reset()
    assert runner.queries is None and len(runner.memory) == 0
    with pytest.raises(RuntimeError, match='no step'):
        runner.probabilities()
    again = [runner.step(tokens, now) for tokens, now in stream]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_spec_round_trips_through_json() -> None:
    spec = step_spec(_model({}))
    assert StepSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec


@pytest.mark.parametrize(('change', 'message'), [
    (lambda d: d.pop('num_heads'), 'missing'),
    (lambda d: d.update(surprise=1), 'unknown'),
    (lambda d: d.update(num_queries='6'), 'num_queries'),
    (lambda d: d.update(num_layers=True), 'num_layers'),
    (lambda d: d.update(hidden_size=1 << 20), 'hidden_size'),
    (lambda d: d.update(cross_layers=[0, 9]), 'inconsistent'),
    (lambda d: d.update(decay_rates=[1.0, -2.0]), 'inconsistent'),
    (lambda d: d.update(has_action_head='yes'), 'has_action_head'),
])
def test_spec_refuses_bad_manifests(change, message: str) -> None:
    data = step_spec(_model({})).to_json()
    change(data)
    with pytest.raises(CheckpointError, match=message):
        StepSpec.from_json(data)


def test_age_code_is_not_exported() -> None:
    with pytest.raises(ConfigError, match='time_features'):
        step_spec(_model({'time_features': 8}))


@pytest.mark.slow
def test_graphs_that_do_not_fit_their_spec_are_refused(exported: tuple, tmp_path: Path) -> None:
    _, projection, step, spec = exported
    with pytest.raises(CheckpointError, match='inconsistent'):
        OnnxStep(step, projection, spec, CAPACITY)  # swapped
    broken = tmp_path / 'step.onnx'
    broken.write_bytes(step.read_bytes()[: step.stat().st_size // 2])
    with pytest.raises(CheckpointError, match='cannot load ONNX graph'):
        OnnxStep(projection, broken, spec, CAPACITY)
    runner = OnnxStep(projection, step, spec, CAPACITY)
    with pytest.raises(ValueError, match='do not fit'):
        runner.step(np.zeros((1, TOKENS + 1, FEATURES), np.float32), 0.0)
