"""The step graphs on TensorRT (runtime/tensorrt_step.py), what holds without TensorRT (here)
and, where TensorRT and a CUDA GPU exist, the engines against ONNX Runtime over a stream.

The first half runs everywhere: the graphs' input shapes against the exporter's example
inputs, the cache key of a multi-input engine, the refusals (int8, no TensorRT) and the
torch-free import. The second half builds engines from a real exported bundle and is skipped,
with the reason, where TensorRT, libcudart or a GPU is missing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from malmm_ros.config import AnticipateConfig, model_preset
from malmm_ros.data.sample_stream import panning_frames
from malmm_ros.errors import CheckpointError, ConfigError
from malmm_ros.imaging import resize_and_crop
from malmm_ros.labels import LabelMaps
from malmm_ros.model.malmm import MalmmModel
from malmm_ros.pipeline import AnticipationPipeline
from malmm_ros.pipeline.onnx_runner import tensorrt_graphs
from malmm_ros.runtime import create_encoder
from malmm_ros.runtime.bundle import Bundle, read_calibration, write_calibration
from malmm_ros.runtime.engine_cache import EngineCache, EngineKey
from malmm_ros.runtime.onnx_step import OnnxStep
from malmm_ros.runtime.step_export import example_inputs, step_spec
from malmm_ros.runtime.tensorrt_step import (
    INSTALL_HINT,
    TensorRTGraph,
    require_tensorrt,
    step_graph_shapes,
    tensorrt_available,
)

REPO = Path(__file__).resolve().parents[2]
SHA = '3fa2c0d9e1b7' + 'a' * 52
LAYOUTS = {  # the layouts test_onnx_step.py exports, small
    'shared decays': {},
    'extra decays': {'decay_channels': 'extra'},
    'no decays, no order': {'value_decays': 0, 'order_bias': False},
    'one layer': {'num_layers': 1, 'cross_attention_every': 1},
}
SMALL = {'num_layers': 3, 'hidden_size': 32, 'num_heads': 4, 'intermediate_size': 48,
         'num_queries': 6, 'encoder_width': 24, 'cross_attention_every': 2, 'value_decays': 4}


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import tensorrt` fails, as on a machine without it (also where it is installed)."""
    monkeypatch.setitem(sys.modules, 'tensorrt', None)


# --------------------------------------------------------------------------------------------
# Without TensorRT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
@pytest.mark.parametrize('capacity', [1, 20])
def test_graph_shapes_are_the_exporters_example_inputs(layout: str, capacity: int) -> None:
    """An independent source: the torch exporter's example inputs for the same spec."""
    model = MalmmModel(model_preset('edge', **{**SMALL, **LAYOUTS[layout]}),
                       LabelMaps.placeholder(num_verbs=5, num_nouns=7), feature_dim=16,
                       num_tokens=7)
    spec = step_spec(model)
    projection, step = step_graph_shapes(spec, capacity)
    assert list(projection) == spec.projection_inputs() and list(step) == spec.step_inputs()
    examples = example_inputs(spec, capacity)
    for name, shape in {**projection, **step}.items():
        assert tuple(examples[name].shape) == shape, name


def _graph_key(**changes: object) -> EngineKey:
    shapes = (('visual_buckets', (1029,)), ('cross0_k', (4, 1029, 32)))
    key = EngineKey(SHA, '10.3.0', 'NVIDIA Orin', '8.7', 'fp16', shapes[0][1],
                    input_shapes=shapes)
    return dataclasses.replace(key, **changes)


def test_a_graph_key_round_trips_and_names_its_shapes() -> None:
    key = _graph_key()
    data = json.loads(json.dumps(key.to_dict()))
    assert data['input_shapes'] == [['visual_buckets', [1029]], ['cross0_k', [4, 1029, 32]]]
    assert EngineKey.from_dict(data) == key
    other_m = _graph_key(input_shape=(1071,), input_shapes=(('visual_buckets', (1071,)),
                                                            ('cross0_k', (4, 1071, 32))))
    assert other_m.filename('step') != key.filename('step')
    assert key.filename('step').startswith('step-3fa2c0d9e1b7-trt10.3.0-nvidia-orin-sm87-fp16-'
                                           '1029-in')
    assert 'input_shapes' in ''.join(other_m.differences(key))


def test_an_encoder_key_reads_and_writes_as_before() -> None:
    """No input_shapes in an encoder's sidecar: old sidecars load, new ones look the same."""
    key = EngineKey(SHA, '10.3.0', 'NVIDIA Orin', '8.7', 'fp16', (1, 224, 224, 3))
    assert 'input_shapes' not in key.to_dict()
    assert key.filename() == ('efficientnet_lite0-3fa2c0d9e1b7-trt10.3.0-nvidia-orin-sm87-fp16-'
                              '1x224x224x3.engine')


@pytest.mark.parametrize(('shapes', 'message'), [
    ([('a', (1,)), ('a', (2,))], 'unique'),
    ([('a', (0,))], 'positive'),
    ([('', (1,))], 'name'),
    ('visual_buckets', 'pairs'),
    ([('b', (2,)), ('a', (1,))], 'first of input_shapes'),
])
def test_a_graph_key_refuses_malformed_shapes(shapes: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EngineKey(SHA, '10.3.0', 'NVIDIA Orin', '8.7', 'fp16', (1,), input_shapes=shapes)


def test_the_cache_misses_when_the_memory_length_changes(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path, stem='step')
    key = _graph_key()
    cache.store(key, b'engine for M = 20')
    other_m = _graph_key(input_shapes=(('visual_buckets', (1029,)), ('cross0_k', (4, 1029, 16))))
    assert cache.lookup(other_m) is None and cache.lookup(key) is not None
    assert cache.stale(other_m) == []  # another shape is not stale: both may be in use


def test_int8_and_unknown_precisions_are_refused_first(tmp_path: Path) -> None:
    """Before TensorRT is even looked for: the refusal says why, wherever it runs."""
    with pytest.raises(ConfigError, match='int8 is for the encoder.*fp16 or fp32'):
        TensorRTGraph(tmp_path / 'step.onnx', cache_dir=tmp_path, precision='int8',
                      shapes={'x': (1,)})
    with pytest.raises(ConfigError, match="got 'bf16'"):
        TensorRTGraph(tmp_path / 'step.onnx', cache_dir=tmp_path, precision='bf16',
                      shapes={'x': (1,)})


def test_without_tensorrt_the_error_is_the_install_hint(no_tensorrt: None,
                                                        tmp_path: Path) -> None:
    available, why = tensorrt_available()
    assert not available and 'not importable' in why
    with pytest.raises(ConfigError, match=r'pip install \.\[tensorrt\]') as info:
        require_tensorrt()
    assert INSTALL_HINT in str(info.value) and why in str(info.value)
    with pytest.raises(ConfigError, match='not importable'):
        TensorRTGraph(tmp_path / 'step.onnx', cache_dir=tmp_path, shapes={'x': (1,)})


def test_the_module_imports_without_torch_or_tensorrt() -> None:
    code = ('import sys\n'
            "sys.modules['torch'] = None\n"
            'import malmm_ros.runtime.tensorrt_step, malmm_ros.pipeline.onnx_runner\n'
            "print('tensorrt' in sys.modules)\n")
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == 'False'


def test_calibration_frames_round_trip(tmp_path: Path) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    write_calibration(tmp_path / 'calibration.npz', frames)
    back = read_calibration(tmp_path / 'calibration.npz')
    assert back.dtype == np.uint8 and np.array_equal(back, frames)


class _Detonator:
    """Unpickling it leaves a file behind: proof that a reader unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize('content', [
    'float frames', 'small frames', 'no frames', 'pickled objects', 'two arrays', 'not a zip',
])
def test_bad_calibration_files_are_refused(tmp_path: Path, content: str) -> None:
    path, marker = tmp_path / 'calibration.npz', tmp_path / 'unpickled'
    frames = np.zeros((2, 224, 224, 3), np.uint8)
    if content == 'float frames':
        np.savez_compressed(path, frames=frames.astype(np.float32))
    elif content == 'small frames':
        np.savez_compressed(path, frames=frames[:, :100, :100])
    elif content == 'no frames':
        np.savez_compressed(path, frames=frames[:0])
    elif content == 'pickled objects':
        np.savez(path, frames=np.array([_Detonator(marker)], dtype=object))
    elif content == 'two arrays':
        np.savez(path, frames=frames, extra=frames)
    else:
        path.write_bytes(b'PK\x03\x04 truncated')
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        read_calibration(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# The pipeline without TensorRT (a real bundle)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # the session's bundle
def test_runtime_onnx_with_backend_tensorrt_needs_tensorrt(edge_bundle: Path,
                                                           no_tensorrt: None) -> None:
    config = AnticipateConfig().replace(runtime='onnx', bundle=str(edge_bundle),
                                        backend='tensorrt')
    with pytest.raises(ConfigError, match=r'pip install \.\[tensorrt\].*not importable'):
        AnticipationPipeline(config)


@pytest.mark.slow  # the session's bundle
def test_calibration_frames_must_be_as_many_as_the_manifest_says(edge_bundle: Path,
                                                                 tmp_path: Path) -> None:
    bundle = Bundle.open(edge_bundle)
    manifest = dict(bundle.manifest, calibration={'frames': 3})
    with pytest.raises(CheckpointError, match='the manifest says 3'):
        dataclasses.replace(bundle, manifest=manifest).calibration_frames()


# --------------------------------------------------------------------------------------------
# With TensorRT and a CUDA GPU
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def gpu() -> None:
    available, why = tensorrt_available()
    if not available:
        pytest.skip(f'needs TensorRT >= 10, libcudart and a CUDA GPU: {why}')


def _tokens(bundle: Bundle, count: int) -> list[np.ndarray]:
    """Encoder tokens of real photos panned at 1 fps (ONNX Runtime fp32, the same for both)."""
    encoder = create_encoder('onnxruntime', threads=1, precision='fp32',
                             onnx_path=bundle.encoder('fp32'))
    return [encoder.run(resize_and_crop(image)[None])
            for image, _ in panning_frames(float(count), fps=1.0)]


def _open_tensorrt(bundle: Bundle, capacity: int, precision: str, cache: Path):
    config = AnticipateConfig().replace(runtime='onnx', bundle=str(bundle.path),
                                        backend='tensorrt', precision=precision,
                                        memory_bank_length=capacity, engine_dir=str(cache))
    return tensorrt_graphs(config, bundle)


@pytest.mark.slow
@pytest.mark.parametrize(('precision', 'tolerance'), [('fp32', 1e-3), ('fp16', 2e-2)])
def test_step_engines_follow_onnxruntime(gpu: None, edge_bundle: Path, tmp_path: Path,
                                         precision: str, tolerance: float) -> None:
    """48 frames at M = 8 (40 compressions): TensorRT's probabilities stay within `tolerance`
    of ONNX Runtime's on the same tokens."""
    bundle, capacity = Bundle.open(edge_bundle), 8
    paths = (bundle.file('projection.onnx'), bundle.file('step.onnx'), bundle.spec, capacity)
    reference = OnnxStep(*paths, threads=1)
    engines = OnnxStep(*paths, open_graph=_open_tensorrt(bundle, capacity, precision, tmp_path))
    assert all(isinstance(s, TensorRTGraph) for s in engines.sessions)
    worst = 0.0
    for index, tokens in enumerate(_tokens(bundle, 48)):
        reference.step(tokens, float(index))
        engines.step(tokens, float(index))
        for want, got in zip(reference.probabilities()[:2], engines.probabilities()[:2],
                             strict=True):
            worst = max(worst, float(np.abs(want - got).max()))
    assert engines.memory.visual.compressions == reference.memory.visual.compressions == 40
    assert worst <= tolerance, f'{precision}: probabilities differ by up to {worst:.2e}'
    for session in engines.sessions:
        session.close()


@pytest.mark.slow
def test_engines_are_reused_and_rebuilt_for_another_memory_length(
        gpu: None, edge_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bundle = Bundle.open(edge_bundle)

    def start(capacity: int) -> OnnxStep:
        return OnnxStep(bundle.file('projection.onnx'), bundle.file('step.onnx'), bundle.spec,
                        capacity, open_graph=_open_tensorrt(bundle, capacity, 'fp16', tmp_path))

    start(4)
    built = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob('*.engine')}
    assert len(built) == 2  # projection and step
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='malmm_ros.runtime.engine_cache'):
        start(4).step(_tokens(bundle, 1)[0], 0.0)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob('*.engine')} == built
    assert caplog.text.count('using cached engine') == 2 and 'building' not in caplog.text
    start(5)
    engines = sorted(p.name for p in tmp_path.glob('*.engine'))
    assert len(engines) == 3  # a step engine for M = 5; the projection's is the same
    assert sum(name.startswith('step-') for name in engines) == 2


@pytest.mark.slow
@pytest.mark.parametrize('precision', ['fp16', 'int8'])
def test_the_pipeline_runs_on_tensorrt_from_a_bundle(gpu: None, edge_bundle: Path,
                                                     tmp_path: Path, precision: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Encoder and step on TensorRT; int8 calibrates the encoder on the bundle's frames and
    builds the step graphs in fp16, saying so."""
    config = AnticipateConfig().replace(runtime='onnx', bundle=str(edge_bundle),
                                        backend='tensorrt', precision=precision,
                                        engine_dir=str(tmp_path))
    with caplog.at_level(logging.INFO):
        pipeline = AnticipationPipeline(config)
    assert pipeline.encoder.name == f'tensorrt-{precision}'
    assert ('step graphs build in fp16' in caplog.text) == (precision == 'int8')
    count = sum(pipeline.push(image, stamp) is not None
                for image, stamp in panning_frames(5.0, 2.0))
    assert count == 5
