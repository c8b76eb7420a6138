"""ONNX export and the ONNX Runtime backend: graph shape, parity with torch, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import skimage.data
import torch

from malmm_ros.errors import CheckpointError, ConfigError, FrameError
from malmm_ros.imaging import resize_and_crop
from malmm_ros.model.encoder import efficientnet_lite0, normalize
from malmm_ros.runtime import create_encoder
from malmm_ros.runtime.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx
from malmm_ros.runtime.onnxruntime_encoder import OnnxRuntimeEncoder

PHOTOS = ('chelsea', 'coffee', 'astronaut', 'rocket')


@pytest.fixture(scope='module')
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(tmp_path_factory.mktemp('onnx') / 'encoder.onnx')


@pytest.fixture(scope='module')
def torch_net() -> torch.nn.Module:
    return efficientnet_lite0()


@pytest.fixture(scope='module')
def frames() -> np.ndarray:
    return np.stack([resize_and_crop(getattr(skimage.data, name)()) for name in PHOTOS])


def test_graph_has_uint8_nhwc_input_and_token_output(onnx_path: Path) -> None:
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model)
    assert max(op.version for op in model.opset_import if op.domain in ('', 'ai.onnx')) >= 17
    (graph_input,) = model.graph.input
    (graph_output,) = model.graph.output
    assert graph_input.name == INPUT_NAME and graph_output.name == OUTPUT_NAME
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert dims == ['batch', 224, 224, 3]
    out_dims = [d.dim_param or d.dim_value for d in graph_output.type.tensor_type.shape.dim]
    assert out_dims == ['batch', 49, 1280]
    ops = {node.op_type for node in model.graph.node}
    assert {'Cast', 'Sub', 'Div', 'Transpose'} <= ops  # preprocessing lives in the graph


def test_onnxruntime_matches_torch(onnx_path: Path, torch_net: torch.nn.Module,
                                   frames: np.ndarray) -> None:
    encoder = OnnxRuntimeEncoder(onnx_path, threads=2)
    tokens = encoder.run(frames)
    with torch.inference_mode():
        reference = torch_net.tokens(normalize(frames))
        assert tokens.dtype == np.float32 and tokens.shape == (len(PHOTOS), 49, 1280)
        assert np.abs(tokens - reference.numpy()).max() <= 1e-4
        # Same ImageNet top-1 through the classifier on top of the tokens.
        ours = torch_net._fc(torch.from_numpy(tokens).mean(1)).argmax(1)
        theirs = torch_net._fc(reference.mean(1)).argmax(1)
    assert ours.tolist() == theirs.tolist()
    assert 281 <= ours[0] <= 285  # chelsea is a cat


def test_batch_sizes_agree(onnx_path: Path, frames: np.ndarray) -> None:
    encoder = OnnxRuntimeEncoder(onnx_path)
    together = encoder.run(frames)
    alone = np.concatenate([encoder.run(frames[i:i + 1]) for i in range(len(frames))])
    assert np.abs(together - alone).max() <= 1e-5


@pytest.mark.parametrize('bad', [
    np.zeros((1, 224, 224, 3), np.float32), np.zeros((224, 224, 3), np.uint8),
    np.zeros((1, 200, 224, 3), np.uint8),
])
def test_wrong_frames_are_a_frame_error(onnx_path: Path, bad: np.ndarray) -> None:
    with pytest.raises(FrameError, match='expected uint8 frames'):
        OnnxRuntimeEncoder(onnx_path).run(bad)


def test_missing_and_corrupt_onnx_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match='does not exist'):
        OnnxRuntimeEncoder(tmp_path / 'nope.onnx')
    garbage = tmp_path / 'garbage.onnx'
    garbage.write_bytes(b'not a protobuf at all' * 10)
    with pytest.raises(CheckpointError, match='cannot load'):
        OnnxRuntimeEncoder(garbage)


def test_unavailable_provider_is_refused(onnx_path: Path) -> None:
    with pytest.raises(CheckpointError, match='not available'):
        OnnxRuntimeEncoder(onnx_path, providers=['NoSuchExecutionProvider'])


def test_export_refuses_old_opsets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='opset'):
        export_onnx(tmp_path / 'x.onnx', opset=13)
    assert not list(tmp_path.iterdir())


def test_create_encoder_choices(onnx_path: Path) -> None:
    assert create_encoder('onnxruntime', onnx_path=onnx_path).name == 'onnxruntime-cpu'
    assert create_encoder('torch').name.startswith('torch-cpu')
    if not torch.cuda.is_available():
        assert create_encoder('auto', onnx_path=onnx_path).name == 'onnxruntime-cpu'
    with pytest.raises(ConfigError, match='unknown encoder backend'):
        create_encoder('nope')


def test_onnx_is_exported_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('MALMM_ENGINE_DIR', str(tmp_path))
    encoder = create_encoder('onnxruntime')
    assert (tmp_path / 'efficientnet_lite0.onnx').is_file()
    assert encoder.path == tmp_path / 'efficientnet_lite0.onnx'
