"""GPTQ weight rounding: on ONNX Runtime's int8 grid, better outputs than nearest rounding, and
receptive-field moments that match a brute-force computation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from malmm_ros.runtime.weight_rounding import conv_input_moments, round_conv_weights, round_rows


def _correlated_inputs(rng: np.random.Generator, width: int, samples: int) -> np.ndarray:
    """[width, samples] inputs with strongly correlated channels, as a conv layer sees."""
    mixing = rng.normal(size=(width, width)) * np.linspace(0.05, 1.0, width)
    return np.maximum(mixing @ rng.normal(size=(width, samples)), 0.0)  # after a ReLU


def _nearest(w: np.ndarray) -> np.ndarray:
    scale = np.abs(w).max(axis=1, keepdims=True) / 127
    return np.round(w / scale) * scale


@pytest.mark.parametrize('shared', [True, False], ids=['shared-moments', 'per-row-moments'])
def test_rounding_stays_on_the_grid_and_beats_nearest_rounding(shared: bool) -> None:
    rng = np.random.default_rng(0)
    rows, width = 24, 48
    w = rng.normal(size=(rows, width))
    if shared:  # a full conv: every output channel reads the same inputs
        x = _correlated_inputs(rng, width, 4000)
        moments, inputs = x @ x.T, [x] * rows
    else:  # a depthwise conv: every channel reads its own
        inputs = [_correlated_inputs(rng, width, 4000) for _ in range(rows)]
        moments = np.stack([x @ x.T for x in inputs])
    rounded = round_rows(w, moments)

    scale = np.abs(w).max(axis=1, keepdims=True) / 127
    steps = rounded / scale
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-6)  # multiples of the scale
    assert np.abs(steps).max() <= 127 + 1e-6
    # The largest weight keeps its place, so the quantizer derives the same scale.
    np.testing.assert_allclose(np.abs(rounded).max(axis=1), np.abs(w).max(axis=1), rtol=1e-12)

    def output_error(q: np.ndarray) -> float:
        return sum(float(np.sum(((q[r] - w[r]) @ inputs[r]) ** 2)) for r in range(rows))

    ratio = output_error(rounded) / output_error(_nearest(w))
    assert ratio < 0.7, f"output error {ratio:.2f}x that of nearest rounding"


def test_rows_of_zeros_and_dead_inputs_are_left_finite() -> None:
    w = np.zeros((3, 4))
    w[1] = [0.5, -0.25, 0.0, 0.125]
    moments = np.diag([1.0, 0.0, 2.0, 0.0])  # inputs 1 and 3 never fire
    rounded = round_rows(w, moments)
    assert np.isfinite(rounded).all()
    assert not rounded[0].any() and not rounded[2].any()
    assert rounded[1, 0] == 0.5  # the row's largest weight, exactly


def _two_conv_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """x [B, 2, 7, 7] -> a full 3x3 stride-2 conv with pads, and a depthwise 3x3 conv."""
    full = numpy_helper.from_array(rng.normal(size=(3, 2, 3, 3)).astype(np.float32), 'w_full')
    depthwise = numpy_helper.from_array(rng.normal(size=(2, 1, 3, 3)).astype(np.float32),
                                        'w_dw')
    nodes = [
        helper.make_node('Conv', ['x', 'w_full'], ['full'], name='full', strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node('Conv', ['x', 'w_dw'], ['dw'], name='dw', group=2),
    ]
    graph = helper.make_graph(
        nodes, 'two_convs', [helper.make_tensor_value_info('x', TensorProto.FLOAT,
                                                           [None, 2, 7, 7])],
        [helper.make_tensor_value_info('full', TensorProto.FLOAT, None),
         helper.make_tensor_value_info('dw', TensorProto.FLOAT, None)], [full, depthwise])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)], ir_version=8)


def test_moments_match_brute_force_receptive_fields() -> None:
    rng = np.random.default_rng(1)
    model = _two_conv_graph(rng)
    x = rng.normal(size=(5, 2, 7, 7)).astype(np.float32)
    moments = conv_input_moments(model, x, 'x')

    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    full = np.zeros((18, 18))
    depthwise = np.zeros((2, 9, 9))
    for b in range(len(x)):
        for oy in range(4):  # (7 + 2 - 3) // 2 + 1
            for ox in range(4):
                field = padded[b, :, 2 * oy:2 * oy + 3, 2 * ox:2 * ox + 3].reshape(-1)
                full += np.outer(field, field)
        for oy in range(5):  # 7 - 3 + 1, no pads
            for ox in range(5):
                for c in range(2):
                    field = x[b, c, oy:oy + 3, ox:ox + 3].reshape(-1).astype(np.float64)
                    depthwise[c] += np.outer(field, field)
    np.testing.assert_allclose(moments['full'], full, rtol=1e-5)
    np.testing.assert_allclose(moments['dw'], depthwise, rtol=1e-5)


def test_round_conv_weights_changes_only_the_weights() -> None:
    rng = np.random.default_rng(2)
    model = _two_conv_graph(rng)
    original = model.SerializeToString()
    rounded = round_conv_weights(model, rng.normal(size=(3, 2, 7, 7)).astype(np.float32), 'x')
    assert model.SerializeToString() == original  # a copy is rounded, not the caller's model
    assert [n.name for n in rounded.graph.node] == [n.name for n in model.graph.node]
    for before, after in zip(model.graph.initializer, rounded.graph.initializer, strict=True):
        w, q = numpy_helper.to_array(before), numpy_helper.to_array(after)
        assert q.shape == w.shape and q.dtype == np.float32
        rows = q.reshape(len(q), -1) / (np.abs(w.reshape(len(w), -1)).max(1, keepdims=True) / 127)
        np.testing.assert_allclose(rows, np.round(rows), atol=1e-4)
        assert not np.array_equal(q, w)
