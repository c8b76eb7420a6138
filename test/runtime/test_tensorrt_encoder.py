"""The TensorRT backend: what must hold without TensorRT (here), and engine parity where it runs.

The first half runs everywhere: availability reporting, the ConfigError with the install hint,
and the cache key built from the TensorRT version and GPU (with a stand-in `tensorrt` module and
stand-in device queries, since neither exists here). The second half needs TensorRT and a CUDA
GPU and is skipped, with the reason shown, elsewhere.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from malmm_ros.errors import CheckpointError, ConfigError, FrameError
from malmm_ros.runtime import create_encoder, tensorrt_encoder
from malmm_ros.runtime.engine_cache import EngineCache
from malmm_ros.runtime.tensorrt_encoder import (
    INSTALL_HINT,
    TensorRTEncoder,
    build_engine,
    current_key,
    tensorrt_available,
)

TRT_SKIP_REASON = (
    'TensorRT is not installable here (no GPU; GB-scale wheels): the engine build and parity '
    'tests run where it is'
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


def _stand_in_machine(
    monkeypatch: pytest.MonkeyPatch, version: str = '10.3.0', cuda: bool = True
) -> None:
    """A `tensorrt` module reporting `version` and a torch that reports a Jetson Orin GPU."""
    module = types.ModuleType('tensorrt')
    module.__version__ = version
    monkeypatch.setitem(sys.modules, 'tensorrt', module)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: cuda)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'Orin (nvgpu)')
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (8, 7))


# --------------------------------------------------------------------------------------------
# Without TensorRT
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # a fresh process that imports torch
def test_module_does_not_import_tensorrt() -> None:
    code = (
        'import sys, malmm_ros.runtime.tensorrt_encoder, malmm_ros.runtime.engine_cache\n'
        'print("tensorrt" in sys.modules)\n'
    )
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'False'


def test_tensorrt_is_not_available_on_this_machine() -> None:
    if importlib.util.find_spec('tensorrt') is not None and torch.cuda.is_available():
        pytest.skip('TensorRT and a CUDA GPU are present on this machine')
    ok, reason = tensorrt_available()
    assert ok is False
    assert reason.strip()


def test_missing_package_is_reported(no_tensorrt: None) -> None:
    ok, reason = tensorrt_available()
    assert ok is False
    assert 'not importable' in reason


def test_missing_gpu_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_in_machine(monkeypatch, cuda=False)
    assert tensorrt_available() == (
        False, 'TensorRT 10.3.0 is installed but torch sees no CUDA GPU'
    )


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
    module = pytest.importorskip('tensorrt', reason=TRT_SKIP_REASON)
    if not torch.cuda.is_available():
        pytest.skip('TensorRT imports but torch sees no CUDA GPU')
    return module


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
