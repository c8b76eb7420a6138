"""The TensorRT backend: what must hold without TensorRT (here), and engine parity where it runs.

The first half runs everywhere: the torch-free import, availability reporting (against this
machine's real CUDA runtime where it has one), the ConfigError with the install hint, and the
cache key built from the TensorRT version and GPU (with a stand-in `tensorrt` module and a
stand-in CUDA runtime answering the device queries, since neither a GPU nor TensorRT is here).
The second half needs TensorRT, libcudart and a CUDA GPU and is skipped, with the reason shown,
elsewhere.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from malmm_ros.errors import CheckpointError, ConfigError, FrameError, MalmmError
from malmm_ros.runtime import create_encoder, cuda_buffers, tensorrt_encoder, tensorrt_step
from malmm_ros.runtime.engine_cache import EngineCache
from malmm_ros.runtime.tensorrt_encoder import (
    INSTALL_HINT,
    TensorRTEncoder,
    build_engine,
    current_key,
    tensorrt_available,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def onnx_placeholder(tmp_path: Path) -> Path:
    """An existing file where the ONNX export would be (never parsed in these tests)."""
    path = tmp_path / 'efficientnet_lite0.onnx'
    path.write_bytes(b'placeholder onnx bytes')
    return path


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import tensorrt` fail, as on a machine without it (also where it is installed)."""
    monkeypatch.setitem(sys.modules, 'tensorrt', None)


class _OrinRuntime:
    """Answers the device queries of cuda_buffers.CudaRuntime as JetPack's libcudart on a
    Jetson Orin would (`gpus` of them)."""

    def __init__(self, gpus: int) -> None:
        self.gpus = gpus

    def device_count(self) -> int:
        return self.gpus

    def device_name(self, device: int = 0) -> str:
        return 'Orin (nvgpu)'

    def compute_capability(self, device: int = 0) -> str:
        return '8.7'


def _stand_in_tensorrt(monkeypatch: pytest.MonkeyPatch, version: str = '10.3.0') -> None:
    """A `tensorrt` module reporting `version` (nothing else of it is reached here)."""
    module = types.ModuleType('tensorrt')
    module.__version__ = version
    monkeypatch.setitem(sys.modules, 'tensorrt', module)


def _stand_in_machine(
    monkeypatch: pytest.MonkeyPatch, version: str = '10.3.0', cuda: bool = True
) -> None:
    """A `tensorrt` module reporting `version` and a CUDA runtime that reports a Jetson Orin
    GPU (none when not `cuda`)."""
    _stand_in_tensorrt(monkeypatch, version)
    orin = _OrinRuntime(gpus=1 if cuda else 0)
    monkeypatch.setattr(tensorrt_encoder, 'cuda_runtime', lambda: orin)


# --------------------------------------------------------------------------------------------
# Without TensorRT
# --------------------------------------------------------------------------------------------


def test_module_imports_and_answers_without_torch() -> None:
    """A robot without torch: the module imports, imports no TensorRT until asked, and
    `tensorrt_available()` answers through libcudart."""
    code = (
        'import json, sys\n'
        "sys.modules['torch'] = None  # from here on, importing torch raises ImportError\n"
        'import malmm_ros.runtime.tensorrt_encoder as encoder\n'
        "loaded = 'tensorrt' in sys.modules\n"
        "print(json.dumps({'tensorrt_loaded': loaded,\n"
        "                  'available': encoder.tensorrt_available()}))\n"
    )
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report['tensorrt_loaded'] is False
    ok, reason = report['available']
    if ok:
        pytest.skip(f'TensorRT and a CUDA GPU are present on this machine: {reason}')
    assert 'torch' not in reason
    # What is missing is named: the package, or (with it) libcudart, the driver or a GPU.
    assert re.search(r'tensorrt package|too old|libcudart|driver|no GPU', reason), reason


def test_tensorrt_is_not_available_on_this_machine() -> None:
    ok, reason = tensorrt_available()
    if ok:
        pytest.skip(f'TensorRT and a CUDA GPU are present on this machine: {reason}')
    assert reason.strip()


def test_step_graphs_share_the_logger_and_the_hint() -> None:
    """TensorRT keeps one logger per process: both runners must hand it the same one."""
    assert tensorrt_step.tensorrt_logger is tensorrt_encoder.tensorrt_logger
    assert tensorrt_step.INSTALL_HINT is tensorrt_encoder.INSTALL_HINT
    assert tensorrt_step.tensorrt_available is tensorrt_encoder.tensorrt_available


def test_missing_package_is_reported(no_tensorrt: None) -> None:
    ok, reason = tensorrt_available()
    assert ok is False
    assert 'not importable' in reason


def test_missing_gpu_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_in_machine(monkeypatch, cuda=False)
    assert tensorrt_available() == (False, 'TensorRT 10.3.0 is installed but CUDA sees no GPU')


def test_missing_libcudart_is_reported_with_what_to_install(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real loader, pointed at a library that is not there (a robot without CUDA)."""
    _stand_in_tensorrt(monkeypatch)
    monkeypatch.setattr(tensorrt_encoder, 'cuda_runtime',
                        lambda: cuda_buffers.cuda_runtime(['libcudart-missing.so.0']))
    ok, reason = tensorrt_available()
    assert ok is False
    assert reason.startswith('TensorRT 10.3.0 is installed but the CUDA runtime is not: ')
    assert 'libcudart' in reason and cuda_buffers.CUDA_HINT in reason


def test_this_machines_cuda_runtime_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """With TensorRT stood in, the answer is this machine's libcudart's: here, no driver."""
    try:
        cuda = cuda_buffers.cuda_runtime()
        gpus = cuda.device_count()
    except ConfigError:
        pytest.skip('no libcudart on this machine (the missing-library case is tested above)')
    except cuda_buffers.CudaError as exc:
        gpus, error = 0, str(exc)
    else:
        error = None
    if gpus:
        pytest.skip('this machine has a CUDA GPU')
    _stand_in_tensorrt(monkeypatch)
    ok, reason = tensorrt_available()
    assert ok is False
    if error is None:
        assert reason == 'TensorRT 10.3.0 is installed but CUDA sees no GPU'
    else:
        assert reason == ('TensorRT 10.3.0 is installed but CUDA has no usable driver or GPU: '
                          f'{error}')


def test_tensorrt_8_is_too_old(monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_in_machine(monkeypatch, version='8.6.1')
    ok, reason = tensorrt_available()
    assert ok is False and 'too old' in reason


def test_requesting_the_encoder_without_tensorrt_is_a_config_error(
    no_tensorrt: None, onnx_placeholder: Path, tmp_path: Path
) -> None:
    hint = re.escape(INSTALL_HINT)
    assert 'pip install .[tensorrt]' in INSTALL_HINT
    with pytest.raises(ConfigError, match=hint):
        TensorRTEncoder(onnx_placeholder, cache_dir=tmp_path / 'engines')
    with pytest.raises(ConfigError, match=hint):
        build_engine(onnx_placeholder)
    with pytest.raises(ConfigError, match=hint):
        current_key(onnx_placeholder, 'fp16')
    assert not (tmp_path / 'engines').exists()


def test_current_key_describes_this_tensorrt_and_gpu(
    monkeypatch: pytest.MonkeyPatch, onnx_placeholder: Path
) -> None:
    _stand_in_machine(monkeypatch)
    key = current_key(onnx_placeholder, 'fp16', (2, 224, 224, 3))
    assert key.tensorrt_version == '10.3.0'
    assert key.gpu_name == 'Orin (nvgpu)'
    assert key.compute_capability == '8.7'
    assert key.precision == 'fp16'
    assert key.input_shape == (2, 224, 224, 3)
    assert key.filename().endswith('-trt10.3.0-orin-nvgpu-sm87-fp16-2x224x224x3.engine')


def test_tensorrt_upgrade_misses_the_cache_and_reports_the_old_engine(
    monkeypatch: pytest.MonkeyPatch, onnx_placeholder: Path, tmp_path: Path
) -> None:
    """A JetPack upgrade: same ONNX and GPU, new TensorRT -> no hit, old engine listed as stale."""
    cache = EngineCache(tmp_path)
    _stand_in_machine(monkeypatch, version='10.3.0')
    before = current_key(onnx_placeholder, 'fp16')
    old_engine = cache.store(before, b'engine built by 10.3.0')
    assert cache.lookup(before) == old_engine

    _stand_in_machine(monkeypatch, version='10.7.0')
    after = current_key(onnx_placeholder, 'fp16')
    assert cache.lookup(after) is None
    assert cache.stale(after) == [old_engine]
    assert old_engine.exists()


def test_unknown_precision_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, onnx_placeholder: Path, tmp_path: Path
) -> None:
    _stand_in_machine(monkeypatch)
    with pytest.raises(ConfigError, match='bf16'):
        current_key(onnx_placeholder, 'bf16')
    with pytest.raises(ConfigError, match='bf16'):
        build_engine(onnx_placeholder, precision='bf16')
    with pytest.raises(ConfigError, match='bf16'):
        TensorRTEncoder(onnx_placeholder, cache_dir=tmp_path, precision='bf16')


def test_unusable_cache_dir_is_a_config_error_before_any_build(
    monkeypatch: pytest.MonkeyPatch, onnx_placeholder: Path, tmp_path: Path
) -> None:
    """Checked before the key, the runtime and a minutes-long build (the stand-in has none)."""
    _stand_in_machine(monkeypatch)
    blocker = tmp_path / 'blocker'
    blocker.write_text('a file where the cache folder should be')
    with pytest.raises(ConfigError, match=re.escape(f'engine_dir {blocker / "engines"}: ')):
        TensorRTEncoder(onnx_placeholder, cache_dir=blocker / 'engines')
    with pytest.raises(ConfigError, match=re.escape(f'engine_dir {blocker}: ')):
        TensorRTEncoder(onnx_placeholder, cache_dir=blocker)


def test_create_encoder_tensorrt_exports_onnx_into_engine_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """engine_dir reaches the ONNX export too, not only the engine cache."""
    _stand_in_machine(monkeypatch)
    monkeypatch.setenv('MALMM_ENGINE_DIR', str(tmp_path / 'default_cache'))
    blocker = tmp_path / 'blocker'
    blocker.write_text('a file where the cache folder should be')
    with pytest.raises(ConfigError, match=re.escape(f'engine_dir {blocker / "engines"}: ')):
        create_encoder('tensorrt', engine_dir=blocker / 'engines')
    assert not (tmp_path / 'default_cache').exists()


def test_int8_without_calibration_frames_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, onnx_placeholder: Path
) -> None:
    _stand_in_machine(monkeypatch)
    with pytest.raises(ConfigError, match='calibration_frames'):
        build_engine(onnx_placeholder, precision='int8')


def test_missing_onnx_file_is_a_checkpoint_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _stand_in_machine(monkeypatch)
    missing = tmp_path / 'missing.onnx'
    for call in (lambda: current_key(missing, 'fp16'), lambda: build_engine(missing)):
        with pytest.raises(CheckpointError, match=re.escape(str(missing))):
            call()


def test_calibration_frames_accept_single_frames_and_batches() -> None:
    frame = np.full((224, 224, 3), 7, dtype=np.uint8)
    batch = np.zeros((3, 224, 224, 3), dtype=np.uint8)
    frames = list(tensorrt_encoder._single_frames([frame, batch]))
    assert len(frames) == 4
    assert all(f.shape == (224, 224, 3) and f.dtype == np.uint8 for f in frames)
    assert frames[0][0, 0, 0] == 7


@pytest.mark.parametrize('bad', [
    np.zeros((224, 224, 3), dtype=np.float32),
    np.zeros((256, 256, 3), dtype=np.uint8),
    np.zeros((2, 224, 224, 4), dtype=np.uint8),
])
def test_calibration_frames_reject_wrong_frames(bad: np.ndarray) -> None:
    with pytest.raises(FrameError):
        list(tensorrt_encoder._single_frames([bad]))


# --------------------------------------------------------------------------------------------
# With TensorRT and a CUDA GPU
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def trt() -> types.ModuleType:
    available, why = tensorrt_available()
    if not available:
        pytest.skip(f'needs TensorRT >= 10, libcudart and a CUDA GPU: {why}')
    import tensorrt

    return tensorrt


@pytest.fixture(scope='module')
def engine_dir(trt: types.ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp('engines')


@pytest.fixture(scope='module')
def onnx_export(trt: types.ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from malmm_ros.runtime.onnx_export import export_onnx

    return export_onnx(tmp_path_factory.mktemp('onnx') / 'efficientnet_lite0.onnx')


@pytest.fixture(scope='module')
def fp16_encoder(onnx_export: Path, engine_dir: Path) -> TensorRTEncoder:
    return TensorRTEncoder(onnx_export, cache_dir=engine_dir, precision='fp16', max_batch=2)


@pytest.fixture(scope='module')
def images() -> np.ndarray:
    import skimage.data

    from malmm_ros.imaging import resize_and_crop

    return np.stack([resize_and_crop(skimage.data.chelsea()),
                     resize_and_crop(skimage.data.coffee())])  # [2, 224, 224, 3]


def _reference_tokens(frames: np.ndarray) -> np.ndarray:
    """The torch fp32 encoder on the CPU: what every backend must reproduce."""
    import torch

    from malmm_ros.model.encoder import efficientnet_lite0, normalize

    model = efficientnet_lite0(pretrained=True)
    with torch.inference_mode():
        return model.tokens(normalize(frames)).numpy()


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_fp16_engine_matches_the_torch_encoder(
    fp16_encoder: TensorRTEncoder, images: np.ndarray
) -> None:
    want = _reference_tokens(images)
    got = fp16_encoder.run(images)
    assert fp16_encoder.name == 'tensorrt-fp16'
    assert got.shape == (2, 49, 1280) and got.dtype == np.float32
    assert _relative_error(got, want) < 1e-2
    single = fp16_encoder.run(images[1:])  # a smaller batch through the same profile
    assert single.shape == (1, 49, 1280)
    assert _relative_error(single, want[1:]) < 1e-2


def test_second_encoder_loads_the_cached_engine(
    fp16_encoder: TensorRTEncoder, onnx_export: Path, engine_dir: Path,
    images: np.ndarray, caplog: pytest.LogCaptureFixture,
) -> None:
    engine_path = fp16_encoder.engine_path
    built_at = engine_path.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger='malmm_ros.runtime.engine_cache'):
        again = TensorRTEncoder(onnx_export, cache_dir=engine_dir, precision='fp16', max_batch=2)
    assert 'using cached engine' in caplog.text
    assert engine_path.stat().st_mtime_ns == built_at
    assert sorted(p.name for p in engine_dir.glob('*.engine')) == [engine_path.name]
    np.testing.assert_allclose(again.run(images), fp16_encoder.run(images), rtol=0, atol=1e-6)
    again.close()
    again.close()  # idempotent
    with pytest.raises(MalmmError, match='closed'):
        again.run(images)


def _cosine(got: np.ndarray, want: np.ndarray) -> float:
    got, want = got.ravel().astype(np.float64), want.ravel().astype(np.float64)
    return float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))


@pytest.mark.slow  # an INT8 build, calibrated frame by frame: tens of seconds
def test_int8_engine_calibrates_on_uint8_frames(onnx_export: Path, tmp_path: Path,
                                                images: np.ndarray) -> None:
    """The calibrator feeds the uint8 frames themselves (the network's input type) from a
    cuda_buffers device array; the engine it gives stays close to the fp32 reference, and a
    second build reuses the calibration cache it wrote."""
    from malmm_ros.runtime.quantize import default_calibration_frames

    frames = default_calibration_frames(32)
    encoder = TensorRTEncoder(onnx_export, cache_dir=tmp_path, precision='int8',
                              calibration_frames=frames)
    assert encoder.name == 'tensorrt-int8'
    assert len(list(tmp_path.glob('*.calib'))) == 1
    want = _reference_tokens(images)
    got = encoder.run(images[:1])
    assert got.shape == (1, 49, 1280) and got.dtype == np.float32
    assert _cosine(got, want[:1]) > 0.9  # loose: 32 frames, per-tensor scales
    encoder.close()
    for engine in tmp_path.glob('*.engine*'):
        engine.unlink()  # a rebuild, but from the cache: no frames needed
    again = TensorRTEncoder(onnx_export, cache_dir=tmp_path, precision='int8',
                            calibration_frames=[])
    assert _cosine(again.run(images[:1]), want[:1]) > 0.9
    again.close()


@pytest.mark.parametrize('frames', [
    np.zeros((3, 224, 224, 3), dtype=np.uint8),  # more than max_batch
    np.zeros((0, 224, 224, 3), dtype=np.uint8),
    np.zeros((1, 224, 224, 3), dtype=np.float32),
    np.zeros((224, 224, 3), dtype=np.uint8),
])
def test_encoder_rejects_frames_it_cannot_run(
    fp16_encoder: TensorRTEncoder, frames: np.ndarray
) -> None:
    with pytest.raises(FrameError):
        fp16_encoder.run(frames)
