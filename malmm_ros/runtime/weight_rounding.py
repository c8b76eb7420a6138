"""Conv weights rounded onto the int8 grid with error feedback (GPTQ), before quantization.

Rounding each weight of EfficientNet-Lite0 to the nearest int8 step costs most of its INT8 error
(token cosine to fp32 0.977 with nearest rounding, 0.995 with 16-bit weights). GPTQ (Frantar et
al., 2022) rounds one input column at a time and moves the columns not yet rounded to make up for
each rounding error, weighted by the layer's input second moments H = sum x x^T over real frames:
the layer's outputs on such frames move least, not its weights. Here that lifts the cosine to
0.989 at no cost in speed (the graph is the same, only the int8 values differ).

The rounded weights go back into the float graph exactly on the grid ONNX Runtime's quantizer
uses (per output channel, symmetric, scale = max |w| / 127): the largest weight of each channel
is never moved, so the quantizer finds the same scale and keeps every rounded value. (Except in
the few channels, 83 of the encoder's 21,000, whose weights are tiny next to their bias: the
quantizer widens their scale so the bias fits int32, and rounds them again.)
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from numpy.lib.stride_tricks import sliding_window_view
from onnx import numpy_helper

__all__ = ['DAMPING', 'conv_input_moments', 'round_conv_weights', 'round_rows']

DAMPING = 0.01  # of H's mean diagonal, added to it: inputs that never fire stay invertible
_QMAX = 127  # symmetric int8 weights: -127..127
_BATCH = 4  # frames per run while collecting moments (bounds memory: ~50 MB of inputs a frame)


def round_rows(weights: np.ndarray, moments: np.ndarray, damping: float = DAMPING
               ) -> np.ndarray:
    """Weights [R, d] rounded onto their rows' int8 grids (scale max |row| / 127), GPTQ order.

    `moments` is the rows' input second moments, [d, d] shared by every row or [R, d, d] one per
    row (a depthwise conv's channels see different inputs). Returns float64 [R, d] values that
    are integer multiples of each row's scale, within -127..127 of them.
    """
    w = np.array(weights, dtype=np.float64)  # a copy: updated in place column by column
    rows, width = w.shape
    absmax = np.abs(w).max(axis=1)
    scale = np.where(absmax > 0, absmax / _QMAX, 1.0)
    anchor = np.abs(w) == absmax[:, None]  # on the grid's end already: keeps the scale
    h = np.array(moments, dtype=np.float64)
    mean_diag = np.einsum('...ii->...i', h).mean(axis=-1)
    damp = np.where(mean_diag > 0, damping * mean_diag, 1.0)
    h += damp[..., None, None] * np.eye(width)
    # Upper Cholesky factor of H^-1: row i holds how rounding column i moves columns i+1.. (the
    # GPTQ recursion of inverse Hessians, all steps at once).
    u = np.swapaxes(np.linalg.cholesky(np.linalg.inv(h)), -1, -2)
    for i in range(width):
        rounded = np.clip(np.round(w[:, i] / scale), -_QMAX, _QMAX) * scale
        error = (w[:, i] - rounded) / u[..., i, i]  # (R,)
        w[:, i] = rounded
        step = error[:, None] * u[..., i, i + 1:]  # (R, d - i - 1)
        step[anchor[:, i + 1:]] = 0.0
        w[:, i + 1:] -= step
    return w


def _attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv nodes whose weights this module can round: constant weights, no dilation, group 1
    or depthwise (one filter per input channel)."""
    weights = {init.name: init for init in model.graph.initializer}
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    found = []
    for node in model.graph.node:
        # A weight shared by several nodes cannot be rounded for each of them.
        if node.op_type != 'Conv' or node.input[1] not in weights or uses[node.input[1]] > 1:
            continue
        shape = tuple(weights[node.input[1]].dims)  # (C_out, C_in / group, kh, kw)
        group = _attribute(node, 'group', 1)
        dilations = _attribute(node, 'dilations', [1, 1])
        if len(shape) != 4 or any(d != 1 for d in dilations):
            continue
        if group == 1 or (shape[1] == 1 and shape[0] == group):
            found.append(node)
    return found


def _patches(x: np.ndarray, node: onnx.NodeProto, kernel: tuple[int, int]) -> np.ndarray:
    """Conv input x [B, C, H, W] -> its receptive fields [B, C, kh * kw, L] (L output pixels)."""
    top, left, bottom, right = _attribute(node, 'pads', [0, 0, 0, 0])
    if top or left or bottom or right:
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    stride_y, stride_x = _attribute(node, 'strides', [1, 1])
    windows = sliding_window_view(x, kernel, axis=(2, 3))[:, :, ::stride_y, ::stride_x]
    b, c, ho, wo, kh, kw = windows.shape
    return windows.transpose(0, 1, 4, 5, 2, 3).reshape(b, c, kh * kw, ho * wo)


def conv_input_moments(model: onnx.ModelProto, frames: np.ndarray, input_name: str
                       ) -> dict[str, np.ndarray]:
    """Conv node name -> the second moments of its receptive fields over `frames`, float64:
    [C_in*kh*kw, C_in*kh*kw] for a full conv, [C, kh*kw, kh*kw] for a depthwise one."""
    convs = _convs(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    inputs = sorted({node.input[0] for node in convs})
    known = {out.name for out in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                                 None)
                              for name in inputs if name not in known)
    options = ort.SessionOptions()
    # Fusions would hide the conv inputs the probe asks for.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=['CPUExecutionProvider'])
    weights = {init.name: init for init in model.graph.initializer}
    moments: dict[str, np.ndarray] = {}
    for start in range(0, len(frames), _BATCH):
        values = dict(zip(inputs, session.run(inputs, {input_name: frames[start:start + _BATCH]}),
                          strict=True))
        for node in convs:
            kernel = tuple(weights[node.input[1]].dims[2:])
            fields = _patches(values[node.input[0]], node, kernel)  # (B, C, k*k, L)
            if _attribute(node, 'group', 1) == 1:  # one moment over every input channel
                b, c, k, length = fields.shape
                fields = fields.reshape(b, c * k, length)
            # Summed over the batch: (C*k*k, C*k*k), or (C, k*k, k*k) for a depthwise conv.
            moment = (fields @ fields.swapaxes(-1, -2)).sum(axis=0)
            moments[node.name] = moments.get(node.name, 0.0) + moment.astype(np.float64)
    return moments


def round_conv_weights(model: onnx.ModelProto, frames: np.ndarray, input_name: str, *,
                       damping: float = DAMPING) -> onnx.ModelProto:
    """A copy of `model` whose conv weights are GPTQ-rounded onto ONNX Runtime's per-channel
    int8 grid, with input moments from `frames` (the graph's input `input_name`)."""
    moments = conv_input_moments(model, frames, input_name)
    rounded = onnx.ModelProto()
    rounded.CopyFrom(model)
    weights = {init.name: init for init in rounded.graph.initializer}
    for node in _convs(rounded):
        tensor = weights[node.input[1]]
        w = numpy_helper.to_array(tensor)
        rows = round_rows(w.reshape(w.shape[0], -1), moments[node.name], damping)
        tensor.CopyFrom(numpy_helper.from_array(rows.reshape(w.shape).astype(w.dtype),
                                                tensor.name))
    return rounded
