"""Static INT8 quantization of the encoder graph for ONNX Runtime, calibrated on real frames.

Settings chosen by measuring on a 2-core AVX-512 VNNI CPU (1 thread, batch 1, timed interleaved
with the fp32 graph's 8-9 ms; token cosine to fp32 over 240 crops of eight photos):
- QDQ, uint8 asymmetric activations, int8 symmetric per-channel weights: 0.58-0.60x fp32,
  cosine 0.977. int8 activations: 0.91x (no faster kernel for them here), same cosine.
  Per-tensor weights: no faster, cosine 0.75; 7-bit weights (reduce_range): cosine 0.93.
- MinMax ranges: Percentile (99.999) and Entropy calibration give the same cosine (0.977) in
  4-6x the time.
- Every operator ONNX Runtime quantizes: float depthwise convs are slower (0.76x) and, through
  ONNX Runtime's QDQ fusions, far less accurate (cosine 0.84).
- `quant_pre_process` first: it folds the exporter's shape arithmetic around the pads. Then
  the explicit pads go into the convs: 0.43x fp32 instead of 0.58x, the same tokens.
- The rest of the error is the weights' (16-bit weights: cosine 0.995, at 2.3x fp32's time), so
  the conv weights are rounded with GPTQ on the calibration frames (`weight_rounding`): cosine
  0.989, at the same speed.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from malmm_ros.errors import CheckpointError, ConfigError, FrameError
from malmm_ros.files import write_atomically
from malmm_ros.imaging import IMAGE_SIZE, describe_image, resize_and_crop
from malmm_ros.runtime.onnx_files import INPUT_NAME
from malmm_ros.runtime.weight_rounding import round_conv_weights

__all__ = ['DEFAULT_CALIBRATION_FRAMES', 'default_calibration_frames', 'quantize_encoder']

DEFAULT_CALIBRATION_FRAMES = 32
# Camera-like 4:3 windows panned across each sample photo: from most of the photo to a close-up,
# so the calibration frames hold objects at several scales.
_WINDOWS = ((300, 400), (240, 320), (180, 240), (120, 160))
_CALIBRATION_BATCH = 8  # frames per calibration run (each run keeps only its tensors' min, max)
_FRAME_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 3)

_log = logging.getLogger(__name__)


def default_calibration_frames(limit: int = DEFAULT_CALIBRATION_FRAMES) -> list[np.ndarray]:
    """`limit` real uint8 frames [224, 224, 3] from the package's sample photos.

    Windows of four sizes pan across each photo of `sample_stream.SCENES`; the frames come
    position by position, each position in every scene and window size, so any prefix holds
    every scene at every scale.
    """
    from malmm_ros.data.sample_stream import SCENES, panning_frames

    if limit < 1:
        raise ConfigError(f'calibration frames: limit must be >= 1, got {limit}')
    steps = -(-limit // (len(SCENES) * len(_WINDOWS)))  # pan positions per scene and window
    pans = [[resize_and_crop(frame) for frame, _ in panning_frames(
        len(SCENES) * steps, fps=1.0, size=size, seconds_per_scene=steps)] for size in _WINDOWS]
    frames = [pan[scene * steps + step] for step in range(steps)
              for scene in range(len(SCENES)) for pan in pans]
    return frames[:limit]


def _checked_frames(frames: Iterable[np.ndarray]) -> np.ndarray:
    """The calibration frames as one uint8 batch [N, 224, 224, 3]; FrameError for a bad one,
    ConfigError for none."""
    batch = []
    for index, frame in enumerate(frames):
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 \
                or frame.shape != _FRAME_SHAPE:
            raise FrameError(f'calibration frame {index}: expected a uint8 array '
                             f'{list(_FRAME_SHAPE)} (resize_and_crop output), got '
                             f'{describe_image(frame)}')
        batch.append(frame)
    if not batch:
        raise ConfigError('no calibration frames: INT8 quantization needs real frames (a bag, '
                          'an image folder, or default_calibration_frames())')
    return np.stack(batch)


class _FrameReader(CalibrationDataReader):
    """The calibration frames as ONNX Runtime feeds, a few frames a run."""

    def __init__(self, frames: np.ndarray) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(
            {INPUT_NAME: frames[start:start + _CALIBRATION_BATCH]}
            for start in range(0, len(frames), _CALIBRATION_BATCH))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _load_fp32(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise CheckpointError(f'fp32 ONNX graph {path} does not exist (export it with '
                              '`malmm-export onnx --out PATH`)')
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf and checker errors: the file is not a usable graph
        reason = ' '.join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f'cannot read the fp32 ONNX graph {path}: {reason}') from None
    inputs = [graph_input.name for graph_input in model.graph.input]
    if inputs != [INPUT_NAME]:
        raise CheckpointError(f'fp32 ONNX graph {path} has inputs {inputs}; the encoder graph '
                              f'has one, {INPUT_NAME!r}')
    return model


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def _fold_pads_into_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with each zero Pad that feeds only a Conv folded into that Conv's own pads.

    The exporter pads explicitly (TF "same" padding is asymmetric at stride 2; a Conv's pads
    may be too). ONNX Runtime folds those Pads at run time in fp32, but not around quantized
    convs, where each stays a copy of a uint8 map: folded first, the INT8 graph runs in
    0.43x fp32's time instead of 0.58x, with bit-identical tokens.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    folded = []
    for pad in model.graph.node:
        users = consumers.get(pad.output[0], []) if pad.op_type == 'Pad' else []
        if len(users) != 1 or users[0].op_type != 'Conv' or len(pad.input) > 3:
            continue  # (a fourth input names the padded axes)
        conv = users[0]
        mode = next((a.s for a in pad.attribute if a.name == 'mode'), b'constant')
        amounts = _constant(model, pad.input[1])
        value = _constant(model, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else 0
        auto_pad = next((a.s for a in conv.attribute if a.name == 'auto_pad'), b'NOTSET')
        if mode != b'constant' or amounts is None or value is None or np.any(value != 0) \
                or auto_pad != b'NOTSET' or len(amounts) != 8:
            continue
        begin, end = amounts[:4], amounts[4:]  # (N, C, H, W) each
        if begin[0] or begin[1] or end[0] or end[1]:
            continue  # pads batch or channels: not a conv's padding
        old = next((list(a.ints) for a in conv.attribute if a.name == 'pads'), [0, 0, 0, 0])
        new = [old[0] + int(begin[2]), old[1] + int(begin[3]), old[2] + int(end[2]),
               old[3] + int(end[3])]  # (top, left, bottom, right)
        for attribute in [a for a in conv.attribute if a.name == 'pads']:
            conv.attribute.remove(attribute)
        conv.attribute.append(onnx.helper.make_attribute('pads', new))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        model.graph.node.remove(pad)
    # The pads' amounts are left unused: drop them (ONNX Runtime warns about each otherwise).
    used = {name for node in model.graph.node for name in node.input}
    unused = {name for pad in folded for name in pad.input[1:]} - used
    for init in [i for i in model.graph.initializer if i.name in unused]:
        model.graph.initializer.remove(init)
    return model


def quantize_encoder(fp32_onnx: str | os.PathLike, out: str | os.PathLike,
                     frames: Iterable[np.ndarray], *, round_weights: bool = True) -> Path:
    """Write the INT8 (QDQ) version of the encoder graph `fp32_onnx` to `out`, atomically.

    `frames`: real uint8 frames [224, 224, 3] (resize_and_crop output) that set the activation
    ranges and, with `round_weights`, the GPTQ weight rounding. A few dozen suffice
    (`default_calibration_frames()`). CheckpointError for an unreadable graph, FrameError for a
    bad frame, ConfigError for no frames or an `out` that cannot be written.
    """
    fp32_onnx, out = Path(fp32_onnx), Path(out)
    batch = _checked_frames(frames)
    model = _load_fp32(fp32_onnx)
    try:  # before the work, so a bad path fails at once
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f'cannot write the INT8 ONNX graph {out} ({exc.strerror or exc})'
                          ) from None
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='malmm-quantize-') as work:
        prepared = Path(work) / 'prepared.onnx'
        # Folds the exporter's shape arithmetic (the TF "same" pads) into constants, so every
        # tensor has a shape the quantizer can use.
        quant_pre_process(model, prepared)
        model = _fold_pads_into_convs(onnx.load(str(prepared)))
        if round_weights:
            model = round_conv_weights(model, batch, INPUT_NAME)
        try:
            with write_atomically(out) as tmp:
                quantize_static(
                    model, tmp, _FrameReader(batch), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True, calibrate_method=CalibrationMethod.MinMax)
        except OSError as exc:
            raise ConfigError(f'cannot write the INT8 ONNX graph {out} '
                              f'({exc.strerror or exc})') from None
    _log.info('quantized %s to INT8 %s on %d calibration frames in %.1f s', fp32_onnx, out,
              len(batch), time.perf_counter() - began)
    return out
