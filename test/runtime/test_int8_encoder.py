"""The INT8 encoder: the real pretrained graph quantized on the default calibration set keeps the
fp32 encoder's ImageNet decisions and tokens, runs without torch, and bad inputs are refused.

The quantized graph is made once per module (9 s on 2 cores, 2 s without the GPTQ weight
rounding; three times that while other jobs load the machine). The frames compared are crops,
flips and scales of scikit-image photos of things ImageNet has classes for (a cat, an espresso,
a rocket, a moped, a camera on a tripod): on photos of things it has no class for (an astronaut,
a clock face, stained tissue) the fp32 network's top two classes are near ties, and top-1
agreement would measure those ties, not the encoder. None of the frames is a calibration frame:
those are fixed windows panned across four sample photos; these are random crops, and two of the
photos (moped, camera) are not calibration scenes at all.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import skimage.data
import torch
from onnx import helper, numpy_helper

from malmm_ros.errors import CheckpointError, ConfigError, FrameError
from malmm_ros.imaging import resize_and_crop
from malmm_ros.model.encoder import efficientnet_lite0
from malmm_ros.runtime import create_encoder, quantize
from malmm_ros.runtime.onnx_export import export_onnx
from malmm_ros.runtime.onnx_files import INPUT_NAME, INT8_ONNX_FILENAME, ONNX_FILENAME, OUTPUT_NAME
from malmm_ros.runtime.onnxruntime_encoder import OnnxRuntimeEncoder
from malmm_ros.runtime.quantize import default_calibration_frames, quantize_encoder

REPO = Path(__file__).resolve().parents[2]
PHOTOS = ('chelsea', 'coffee', 'rocket', 'stereo_motorcycle', 'camera')
FRAMES_PER_PHOTO = 48  # 240 frames


def _photo(name: str) -> np.ndarray:
    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def _views(image: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` frames of `image`: random crops of 60-100 % of each side (scales and offsets),
    every other one flipped left to right."""
    height, width = image.shape[:2]
    frames = []
    for index in range(count):
        crop_h, crop_w = (int(side * rng.uniform(0.6, 1.0)) for side in (height, width))
        top = int(rng.integers(0, height - crop_h + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        crop = image[top:top + crop_h, left:left + crop_w]
        if index % 2:
            crop = crop[:, ::-1]
        frames.append(resize_and_crop(np.ascontiguousarray(crop)))
    return frames


@pytest.fixture(scope='module')
def fp32_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(tmp_path_factory.mktemp('fp32') / ONNX_FILENAME)


@pytest.fixture(scope='module')
def int8_path(fp32_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp('int8') / INT8_ONNX_FILENAME
    return quantize_encoder(fp32_path, out, default_calibration_frames())


@pytest.fixture(scope='module')
def frames() -> np.ndarray:
    rng = np.random.default_rng(2026)
    return np.stack([frame for name in PHOTOS
                     for frame in _views(_photo(name), FRAMES_PER_PHOTO, rng)])


def _tokens(encoder: OnnxRuntimeEncoder, frames: np.ndarray) -> np.ndarray:
    return np.concatenate([encoder.run(frames[i:i + 16]) for i in range(0, len(frames), 16)])


@pytest.fixture(scope='module')
def token_pair(fp32_path: Path, int8_path: Path, frames: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """(fp32 tokens, INT8 tokens) of `frames`, each [N, 49, 1280]."""
    fp32 = OnnxRuntimeEncoder(fp32_path, threads=1)
    int8 = OnnxRuntimeEncoder(int8_path, threads=1, precision='int8')
    return _tokens(fp32, frames), _tokens(int8, frames)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each frame's tokens, flattened: [N]."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --------------------------------------------------------------------------------------------
# The quantized graph
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # exports and quantizes the encoder (module fixtures)
def test_int8_graph_has_the_encoder_interface_and_int8_weights(fp32_path: Path,
                                                               int8_path: Path) -> None:
    model = onnx.load(str(int8_path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == [INPUT_NAME]
    assert [o.name for o in model.graph.output] == [OUTPUT_NAME]
    ops = [node.op_type for node in model.graph.node]
    assert ops.count('QuantizeLinear') >= 49 and ops.count('DequantizeLinear') >= 49
    assert 'Pad' not in ops  # folded into the convs
    int8_weights = [init for init in model.graph.initializer
                    if init.data_type == onnx.TensorProto.INT8 and len(init.dims) == 4]
    assert len(int8_weights) == sum(op == 'Conv' for op in ops) == 49
    assert int8_path.stat().st_size < 0.4 * fp32_path.stat().st_size


@pytest.mark.slow
def test_imagenet_top1_agrees_with_fp32(token_pair: tuple[np.ndarray, np.ndarray],
                                        frames: np.ndarray) -> None:
    """The network's own ImageNet classifier on the mean-pooled tokens, as forward() does."""
    network = efficientnet_lite0()
    with torch.inference_mode():
        fp32, int8 = (network._fc(torch.from_numpy(t).mean(1)).argmax(1).numpy()
                      for t in token_pair)
    same = fp32 == int8
    per_photo = ', '.join(f'{name} {100 * part.mean():.1f} %'
                          for name, part in zip(PHOTOS, np.split(same, len(PHOTOS)), strict=True))
    assert len(frames) >= 200
    assert same.mean() >= 0.97, (f'INT8 vs fp32 top-1 agreement {100 * same.mean():.1f} % over '
                                 f'{len(frames)} frames ({per_photo})')


@pytest.mark.slow
def test_tokens_stay_close_to_fp32(token_pair: tuple[np.ndarray, np.ndarray]) -> None:
    cosine = _cosine(*token_pair)
    assert cosine.mean() >= 0.98 and cosine.min() >= 0.9, (
        f'token cosine INT8 vs fp32: mean {cosine.mean():.4f}, min {cosine.min():.4f}')


@pytest.mark.slow  # quantizes the encoder a second time
def test_weight_rounding_brings_tokens_closer_than_nearest_rounding(
    fp32_path: Path, token_pair: tuple[np.ndarray, np.ndarray], frames: np.ndarray,
    tmp_path: Path,
) -> None:
    nearest_path = quantize_encoder(fp32_path, tmp_path / 'nearest.onnx',
                                    default_calibration_frames(), round_weights=False)
    nearest = _tokens(OnnxRuntimeEncoder(nearest_path, threads=1, precision='int8'), frames)
    fp32, rounded = token_pair
    gptq, plain = _cosine(fp32, rounded).mean(), _cosine(fp32, nearest).mean()
    assert 1 - gptq < 0.8 * (1 - plain), (f'token cosine with GPTQ rounding {gptq:.4f}, '
                                           f'with nearest rounding {plain:.4f}')


# --------------------------------------------------------------------------------------------
# The encoder with precision int8
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_int8_encoder_names_its_precision(int8_path: Path) -> None:
    encoder = create_encoder('onnxruntime', onnx_path=int8_path, precision='int8', threads=1)
    assert encoder.name == 'onnxruntime-cpu-int8' and encoder.path == int8_path
    tokens = encoder.run(np.zeros((2, 224, 224, 3), np.uint8))
    assert tokens.shape == (2, 49, 1280) and tokens.dtype == np.float32
    # fp16 and auto are TensorRT's defaults: ONNX Runtime runs them as fp32.
    for precision in ('fp16', 'auto', 'fp32'):
        assert create_encoder('onnxruntime', onnx_path=int8_path,
                              precision=precision).name == 'onnxruntime-cpu'
    with pytest.raises(ConfigError, match="precision must be one of.*'fp16'"):
        OnnxRuntimeEncoder(int8_path, precision='fp16')


_TORCH_FREE = '''
import sys
sys.modules['torch'] = None  # from here on `import torch` raises ImportError
import numpy as np
from malmm_ros.runtime import create_encoder
from malmm_ros.runtime.onnxruntime_encoder import OnnxRuntimeEncoder
path = sys.argv[1]
frames = np.zeros((1, 224, 224, 3), np.uint8)
direct = OnnxRuntimeEncoder(path, precision='int8', threads=1).run(frames)
chosen = create_encoder('onnxruntime', onnx_path=path, precision='int8', threads=1)
assert np.array_equal(chosen.run(frames), direct)
onnx_loaded = sorted(m for m in sys.modules if m == 'onnx' or m.startswith('onnx.'))
print(chosen.name, direct.shape, onnx_loaded)
'''


@pytest.mark.slow  # a fresh interpreter
def test_int8_encoder_runs_without_torch(int8_path: Path) -> None:
    """With an explicit graph nothing imports torch, nor onnx (the runtime requirements have
    neither)."""
    result = subprocess.run([sys.executable, '-c', _TORCH_FREE, str(int8_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == 'onnxruntime-cpu-int8 (1, 49, 1280) []'


@pytest.mark.slow  # quantizes the encoder once more
def test_cached_int8_graph_is_made_on_first_use(
    fp32_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No graph given: the fp32 export in the cache is quantized on first use and loaded as it
    is after that. (A corrupt cached file is made again by the same code as the fp32 export's,
    which test_onnx_cache.py covers.)"""
    monkeypatch.setenv('MALMM_ENGINE_DIR', str(tmp_path / 'default'))
    cache = tmp_path / 'engines'
    cache.mkdir()
    (cache / ONNX_FILENAME).write_bytes(fp32_path.read_bytes())  # no export needed
    with caplog.at_level(logging.INFO, logger='malmm_ros.runtime'):
        first = OnnxRuntimeEncoder(engine_dir=cache, threads=1, precision='int8')
    assert f'no cached ONNX INT8 graph at {first.path}: quantizing it once' in caplog.text
    assert first.path == cache / INT8_ONNX_FILENAME and first.name == 'onnxruntime-cpu-int8'
    assert {p.name for p in cache.iterdir()} == {ONNX_FILENAME, INT8_ONNX_FILENAME}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='malmm_ros.runtime'):
        again = OnnxRuntimeEncoder(engine_dir=cache, threads=1, precision='int8')
    assert 'quantiz' not in caplog.text
    frame = default_calibration_frames(1)[0][None]
    np.testing.assert_array_equal(again.run(frame), first.run(frame))
    assert not (tmp_path / 'default').exists()


# --------------------------------------------------------------------------------------------
# Bad inputs: refused with errors that say what is wrong
# --------------------------------------------------------------------------------------------


def test_empty_calibration_set_is_refused(tmp_path: Path) -> None:
    out = tmp_path / 'int8.onnx'
    with pytest.raises(ConfigError, match='no calibration frames'):
        quantize_encoder(tmp_path / 'never_read.onnx', out, [])
    with pytest.raises(ConfigError, match='limit must be >= 1'):
        default_calibration_frames(0)
    assert not out.exists()


@pytest.mark.parametrize('bad', [
    np.zeros((200, 224, 3), np.uint8), np.zeros((224, 224, 3), np.float32),
    np.zeros((224, 224), np.uint8), np.zeros((1, 224, 224, 3), np.uint8), [[0, 0, 0]],
], ids=['wrong-size', 'float', 'gray', 'batch', 'list'])
def test_bad_calibration_frame_is_refused_by_index(bad: object, tmp_path: Path) -> None:
    good = np.zeros((224, 224, 3), np.uint8)
    with pytest.raises(FrameError, match=r'calibration frame 1: expected a uint8 array '
                                         r'\[224, 224, 3\]'):
        quantize_encoder(tmp_path / 'never_read.onnx', tmp_path / 'int8.onnx', [good, bad])
    assert not list(tmp_path.iterdir())


def test_missing_or_corrupt_fp32_graph_is_a_checkpoint_error(tmp_path: Path) -> None:
    frames = default_calibration_frames(2)
    with pytest.raises(CheckpointError, match='does not exist'):
        quantize_encoder(tmp_path / 'missing.onnx', tmp_path / 'int8.onnx', frames)
    corrupt = tmp_path / 'corrupt.onnx'
    corrupt.write_bytes(b'\x00not an onnx graph\xff' * 50)
    with pytest.raises(CheckpointError, match=f'cannot read the fp32 ONNX graph {corrupt}'):
        quantize_encoder(corrupt, tmp_path / 'int8.onnx', frames)
    assert not (tmp_path / 'int8.onnx').exists()


@pytest.mark.slow  # exports the encoder
def test_unwritable_output_is_a_config_error_naming_it(fp32_path: Path, tmp_path: Path) -> None:
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    out = blocker / 'int8.onnx'
    with pytest.raises(ConfigError, match=f'cannot write the INT8 ONNX graph {out}'):
        quantize_encoder(fp32_path, out, default_calibration_frames(2))
    assert blocker.read_text() == 'not a folder'


def test_corrupt_int8_graph_given_to_the_encoder_is_refused(tmp_path: Path) -> None:
    corrupt = tmp_path / 'encoder.int8.onnx'
    corrupt.write_bytes(b'truncated')
    with pytest.raises(CheckpointError, match=f'cannot load ONNX file {corrupt}'):
        OnnxRuntimeEncoder(corrupt, precision='int8')
    assert corrupt.read_bytes() == b'truncated'  # a user's file is never replaced


def test_pads_folded_into_convs_give_the_same_outputs() -> None:
    """TF "same" padding at stride 2 (one more row and column at the end) folded into the conv;
    a Pad that a second node also reads stays."""
    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), 'w')
    amounts = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), 'amounts')
    shared = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), 'shared')
    nodes = [
        helper.make_node('Pad', ['x', 'amounts'], ['padded'], name='pad'),
        helper.make_node('Conv', ['padded', 'w'], ['y'], name='conv', strides=[2, 2]),
        helper.make_node('Pad', ['x', 'shared'], ['padded2'], name='pad2'),
        helper.make_node('Conv', ['padded2', 'w'], ['z'], name='conv2'),
        helper.make_node('Identity', ['padded2'], ['p'], name='also_reads_it'),
    ]
    graph = helper.make_graph(
        nodes, 'pads', [helper.make_tensor_value_info('x', onnx.TensorProto.FLOAT,
                                                      [1, 3, 8, 8])],
        [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
         for name in ('y', 'z', 'p')], [weight, amounts, shared])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)], ir_version=8)
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)

    def run(m: onnx.ModelProto) -> list[np.ndarray]:
        session = ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider'])
        return session.run(None, {'x': x})

    before = run(model)
    folded = quantize._fold_pads_into_convs(model)
    assert [n.name for n in folded.graph.node] == ['conv', 'pad2', 'conv2', 'also_reads_it']
    assert [i.name for i in folded.graph.initializer] == ['w', 'shared']
    for a, b in zip(before, run(folded), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_default_calibration_frames_cover_every_scene_and_scale() -> None:
    frames = default_calibration_frames(16)  # 4 photos x 4 window sizes
    assert len(frames) == 16
    assert all(f.dtype == np.uint8 and f.shape == (224, 224, 3) for f in frames)
    assert len({f.tobytes() for f in frames}) == 16
    assert len(default_calibration_frames(5)) == 5 and len(default_calibration_frames(33)) == 33
    np.testing.assert_array_equal(default_calibration_frames(33)[:16], frames)  # stable order
