"""Export the encoder to ONNX with its preprocessing folded into the graph.

Input `frames`: uint8 RGB [batch, 224, 224, 3] (already resized and cropped); output `tokens`:
float32 [batch, 49, 1280]. The cast, (x - mean) / std and NHWC -> NCHW run inside the graph, so
a CPU spends no Python time on them and every backend (ONNX Runtime, TensorRT) gets the same
numbers as `malmm_ros.model.encoder.normalize` followed by the torch network.

The export is cached in the engine folder (`open_onnx`, `ensure_onnx`): made on first use and
made again when the cached file turns out corrupt.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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
from malmm_ros.runtime.engine_cache import CACHE_HINT, ensure_cache_dir

__all__ = ['INPUT_NAME', 'ONNX_FILENAME', 'OUTPUT_NAME', 'EncoderGraph', 'default_engine_dir',
           'ensure_onnx', 'export_onnx', 'open_onnx']

INPUT_NAME = 'frames'
OUTPUT_NAME = 'tokens'
ONNX_FILENAME = 'efficientnet_lite0.onnx'
_log = logging.getLogger(__name__)

T = TypeVar('T')


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


def _one_line(exc: BaseException) -> str:
    """`exc` as one line (ONNX Runtime and onnx messages can span several)."""
    return ' '.join(str(exc).split()) or type(exc).__name__


def open_onnx(onnx_path: str | os.PathLike | None, engine_dir: str | os.PathLike | None,
              load: Callable[[Path], T]) -> tuple[Path, T]:
    """(path, load(path)) for the user's ONNX file `onnx_path`, else for the cached export.

    The cached export lives in `engine_dir` (default: `default_engine_dir()`) and is made on first
    use. A cached file that `load` rejects (truncated, garbage, empty) is exported again once,
    atomically, and loaded again, as a TensorRT engine that fails to deserialize is rebuilt. A
    user's file is never overwritten: a failure to load it is a CheckpointError naming it.
    `load` may raise anything for a file it cannot use.
    """
    if onnx_path:
        path = Path(onnx_path)
        if not path.is_file():
            raise CheckpointError(f'ONNX file {path} does not exist (export it with '
                                  '`malmm-export onnx --out PATH`)')
        try:
            return path, load(path)
        except Exception as exc:  # a bad file fails in the loader's own exception types
            raise CheckpointError(f'cannot load ONNX file {path} (given as onnx_path, so not '
                                  f're-exported): {_one_line(exc)}') from None
    directory = ensure_cache_dir(engine_dir or default_engine_dir())
    path = directory / ONNX_FILENAME
    first_failure = None
    if path.is_file():
        try:
            return path, load(path)
        except Exception as exc:
            first_failure = _one_line(exc)
            _log.warning('cached ONNX export %s failed to load (%s): exporting it again', path,
                         first_failure)
    else:
        _log.info('no exported encoder at %s: exporting it once (a few seconds)', path)
    try:
        export_onnx(path)
    except ConfigError as exc:  # only a write failure: say which setting to change
        raise ConfigError(f'{exc}; {CACHE_HINT}') from None
    try:
        return path, load(path)
    except Exception as exc:
        earlier = (f'; before re-exporting it failed with: {first_failure}' if first_failure
                   else '')
        raise CheckpointError(f'cannot load freshly exported ONNX file {path}: '
                              f'{_one_line(exc)}{earlier}') from None


def _check_onnx(path: Path) -> None:
    onnx.checker.check_model(str(path))  # parses the file: raises for truncated or garbage bytes


def ensure_onnx(onnx_path: str | os.PathLike | None = None,
                engine_dir: str | os.PathLike | None = None) -> Path:
    """The encoder's ONNX file, checked with onnx.checker: `onnx_path`, or the export cached in
    `engine_dir` (exported on first use, exported again once if the cached file is corrupt)."""
    return open_onnx(onnx_path, engine_dir, _check_onnx)[0]
