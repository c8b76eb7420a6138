"""Export the encoder to ONNX with its preprocessing folded into the graph.

Input `frames`: uint8 RGB [batch, 224, 224, 3] (already resized and cropped); output `tokens`:
float32 [batch, 49, 1280]. The cast, (x - mean) / std and NHWC -> NCHW run inside the graph, so
a CPU spends no Python time on them and every backend (ONNX Runtime, TensorRT) gets the same
numbers as `malmm_ros.model.encoder.normalize` followed by the torch network.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from malmm_ros.errors import CheckpointError
from malmm_ros.model.encoder import (
    FEATURE_DIM,
    IMAGE_SIZE,
    MEAN_RGB,
    NUM_TOKENS,
    STD_RGB,
    EfficientNetLite0,
    efficientnet_lite0,
)

__all__ = ['INPUT_NAME', 'ONNX_FILENAME', 'OUTPUT_NAME', 'EncoderGraph', 'default_engine_dir',
           'export_onnx']

INPUT_NAME = 'frames'
OUTPUT_NAME = 'tokens'
ONNX_FILENAME = 'efficientnet_lite0.onnx'
_log = logging.getLogger(__name__)


class EncoderGraph(nn.Module):
    """uint8 NHWC frames -> encoder tokens, the exact computation the ONNX file holds."""

    def __init__(self, network: EfficientNetLite0) -> None:
        super().__init__()
        self.network = network
        self.register_buffer('mean', torch.tensor(MEAN_RGB).view(1, 1, 1, 3))
        self.register_buffer('std', torch.tensor(STD_RGB).view(1, 1, 1, 3))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = (frames.float() - self.mean) / self.std  # (B, H, W, 3)
        return self.network.tokens(x.permute(0, 3, 1, 2))  # (B, 3, H, W) -> (B, 49, 1280)


def default_engine_dir() -> Path:
    """Where exported and compiled encoders are cached.

    $MALMM_ENGINE_DIR if set; else the repository's engines/ folder in a source checkout; else
    ~/.cache/malmm_ros/engines (an installed package cannot write its share folder).
    """
    if os.environ.get('MALMM_ENGINE_DIR'):
        return Path(os.environ['MALMM_ENGINE_DIR'])
    checkout = Path(__file__).resolve().parents[2] / 'engines'
    if checkout.is_dir() and os.access(checkout, os.W_OK):
        return checkout
    return Path.home() / '.cache' / 'malmm_ros' / 'engines'


def export_onnx(path: str | os.PathLike, *, opset: int = 17) -> Path:
    """Write the encoder graph (real pretrained weights) to `path`, checked with onnx.checker.

    The file is written next to its final name and moved into place, so a reader never sees
    half a file.
    """
    if opset < 17:
        raise ValueError(f'opset must be >= 17, got {opset}')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = EncoderGraph(efficientnet_lite0(pretrained=True)).eval()
    example = torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8)
    tmp = path.with_name(path.name + '.tmp')
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript; this fixed-shape CNN exports identically either way.
        warnings.simplefilter('ignore')
        torch.onnx.export(graph, (example,), str(tmp), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=opset, dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: 'batch'}, OUTPUT_NAME: {0: 'batch'}})
    # The tracer leaves the output's non-batch dims symbolic; state them, so consumers (and
    # TensorRT's parser) see [batch, 49, 1280].
    model = onnx.load(str(tmp))
    dims = model.graph.output[0].type.tensor_type.shape.dim
    dims[1].dim_value, dims[2].dim_value = NUM_TOKENS, FEATURE_DIM
    onnx.save(model, str(tmp))
    try:
        onnx.checker.check_model(str(tmp))
    except onnx.checker.ValidationError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f'exported ONNX graph failed onnx.checker: {exc}') from None
    os.replace(tmp, path)
    _log.info('exported encoder to %s (opset %d, %d tokens x %d)', path, opset, NUM_TOKENS,
              FEATURE_DIM)
    return path
