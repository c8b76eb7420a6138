"""Export the encoder to ONNX with its preprocessing folded into the graph.

Input `frames`: uint8 RGB [batch, 224, 224, 3] (already resized and cropped); output `tokens`:
float32 [batch, 49, 1280]. The cast, (x - mean) / std and NHWC -> NCHW run inside the graph, so
a CPU spends no Python time on them and every backend (ONNX Runtime, TensorRT) gets the same
numbers as `malmm_ros.model.encoder.normalize` followed by the torch network.

The export is cached in the engine folder (`open_onnx`, `ensure_onnx`): made on first use and
made again when the cached file turns out corrupt. The names and the cache live in the torch-free
`onnx_files`; they stay importable from here for existing callers.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from malmm_ros.errors import CheckpointError, ConfigError
from malmm_ros.files import atomic_write
from malmm_ros.imaging import IMAGE_SIZE
from malmm_ros.model.encoder import (
    FEATURE_DIM,
    MEAN_RGB,
    NUM_TOKENS,
    STD_RGB,
    EfficientNetLite0,
    efficientnet_lite0,
)
from malmm_ros.runtime.onnx_files import (
    INPUT_NAME,
    ONNX_FILENAME,
    OUTPUT_NAME,
    default_engine_dir,
    ensure_onnx,
    open_onnx,
)

__all__ = ['INPUT_NAME', 'ONNX_FILENAME', 'OUTPUT_NAME', 'EncoderGraph', 'default_engine_dir',
           'ensure_onnx', 'export_onnx', 'open_onnx']

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


def export_onnx(path: str | os.PathLike, *, opset: int = 17) -> Path:
    """Write the encoder graph (real pretrained weights) to `path`, checked with onnx.checker.

    The bytes go to a temp file in the same folder that is then renamed over `path`
    (`atomic_write`): a crash never leaves half a file there, and processes exporting to the same
    path at once each end with a whole file. ConfigError naming `path` if it cannot be written.
    """
    if opset < 17:
        raise ValueError(f'opset must be >= 17, got {opset}')
    path = Path(path)
    try:  # before the export, so a bad path fails at once
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir(exist_ok=True) raises it only for a non-folder
        raise ConfigError(f'cannot write the ONNX export {path} ({path.parent} is not a '
                          'folder)') from None
    except OSError as exc:
        raise ConfigError(f'cannot create the folder of the ONNX export {path} '
                          f'({exc.strerror or exc})') from None
    graph = EncoderGraph(efficientnet_lite0(pretrained=True)).eval()
    example = torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript; this fixed-shape CNN exports identically either way.
        warnings.simplefilter('ignore')
        torch.onnx.export(graph, (example,), buffer, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=opset, dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: 'batch'}, OUTPUT_NAME: {0: 'batch'}})
    # The tracer leaves the output's non-batch dims symbolic; state them, so consumers (and
    # TensorRT's parser) see [batch, 49, 1280].
    model = onnx.load_model_from_string(buffer.getvalue())
    dims = model.graph.output[0].type.tensor_type.shape.dim
    dims[1].dim_value, dims[2].dim_value = NUM_TOKENS, FEATURE_DIM
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise CheckpointError(f'exported ONNX graph failed onnx.checker: {exc}') from None
    try:
        atomic_write(path, model.SerializeToString())
    except OSError as exc:
        raise ConfigError(f'cannot write the ONNX export {path} ({exc.strerror or exc})') from None
    _log.info('exported encoder to %s (opset %d, %d tokens x %d)', path, opset, NUM_TOKENS,
              FEATURE_DIM)
    return path
