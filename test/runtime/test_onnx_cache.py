"""The cached ONNX export: engine_dir honoured, corrupt cached files exported again, bad folders.

Real exports and real ONNX Runtime sessions. One export is shared by the module (copied into the
tests' cache folders); every test points $MALMM_ENGINE_DIR at a temp folder of its own, so the
default cache is never the checkout's engines/.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch

from malmm_ros.errors import CheckpointError, ConfigError
from malmm_ros.imaging import resize_and_crop
from malmm_ros.runtime import create_encoder
from malmm_ros.runtime.engine_cache import ensure_cache_dir
from malmm_ros.runtime.onnx_export import ONNX_FILENAME, ensure_onnx, export_onnx, open_onnx
from malmm_ros.runtime.onnxruntime_encoder import OnnxRuntimeEncoder

REPO = Path(__file__).resolve().parents[2]

CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    'truncated': lambda data: data[:len(data) // 2],  # a copy or a download cut short
    'garbage': lambda data: b'\x00not protobuf\xff' * 64,
    'empty': lambda data: b'',  # disk full while writing
}


@pytest.fixture(scope='module')
def exported(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of one fresh export (exporting takes a few seconds: done once)."""
    return export_onnx(tmp_path_factory.mktemp('export') / ONNX_FILENAME).read_bytes()


@pytest.fixture(scope='module')
def frames() -> np.ndarray:
    return np.stack([resize_and_crop(skimage.data.chelsea()),
                     resize_and_crop(skimage.data.coffee())])  # [2, 224, 224, 3]


@pytest.fixture(scope='module')
def fresh_tokens(exported: bytes, frames: np.ndarray,
                 tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """Tokens of `frames` through the fresh export."""
    path = tmp_path_factory.mktemp('fresh') / ONNX_FILENAME
    path.write_bytes(exported)
    return OnnxRuntimeEncoder(path, threads=1).run(frames)


@pytest.fixture(autouse=True)
def default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default cache folder ($MALMM_ENGINE_DIR) of this test; not created in advance."""
    path = tmp_path / 'default_cache'
    monkeypatch.setenv('MALMM_ENGINE_DIR', str(path))
    return path


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A regular file where a cache folder (or one of its parents) would have to be."""
    path = tmp_path / 'blocker'
    path.write_text('a file, not a folder\n')
    return path


def _names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _cache_with(directory: Path, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ONNX_FILENAME
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------
# engine_dir is where the export goes
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # exports the encoder twice
def test_onnxruntime_exports_into_engine_dir(tmp_path: Path, default_dir: Path,
                                             exported: bytes) -> None:
    engine_dir = tmp_path / 'my' / 'engines'  # missing, parents too
    encoder = create_encoder('onnxruntime', engine_dir=engine_dir, threads=1)
    assert encoder.path == engine_dir / ONNX_FILENAME
    assert encoder.path.read_bytes() == exported
    assert _names(engine_dir) == {ONNX_FILENAME}  # no temp file left behind
    assert not default_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason='auto picks a GPU backend here')
def test_auto_on_the_cpu_uses_the_export_in_engine_dir(tmp_path: Path, default_dir: Path,
                                                       exported: bytes) -> None:
    cached = _cache_with(tmp_path / 'engines', exported)
    encoder = create_encoder('auto', engine_dir=str(tmp_path / 'engines'), threads=1)
    assert encoder.name == 'onnxruntime-cpu'
    assert encoder.path == cached
    assert not default_dir.exists()


def test_ensure_onnx_takes_the_export_from_engine_dir(tmp_path: Path, default_dir: Path,
                                                      exported: bytes) -> None:
    cached = _cache_with(tmp_path / 'engines', exported)
    assert ensure_onnx(None, tmp_path / 'engines') == cached
    assert not default_dir.exists()


# --------------------------------------------------------------------------------------------
# A corrupt cached export is exported again, once
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # exports the encoder again, per case
@pytest.mark.parametrize('corruption', sorted(CORRUPTIONS))
def test_corrupt_cached_export_is_exported_again(
    corruption: str, tmp_path: Path, exported: bytes, frames: np.ndarray,
    fresh_tokens: np.ndarray, caplog: pytest.LogCaptureFixture,
) -> None:
    engine_dir = tmp_path / 'engines'
    cached = _cache_with(engine_dir, CORRUPTIONS[corruption](exported))
    with caplog.at_level(logging.WARNING, logger='malmm_ros.runtime'):
        encoder = create_encoder('onnxruntime', engine_dir=engine_dir, threads=1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f'cached ONNX export {cached} failed to load' in warnings[0]
    assert 'ONNXRuntimeError' in warnings[0]  # the reason ONNX Runtime gave
    assert cached.read_bytes() == exported
    assert _names(engine_dir) == {ONNX_FILENAME}
    np.testing.assert_allclose(encoder.run(frames), fresh_tokens, rtol=0, atol=1e-6)

    caplog.clear()  # the repaired file is used as it is from now on
    with caplog.at_level(logging.INFO, logger='malmm_ros.runtime'):
        again = create_encoder('onnxruntime', engine_dir=engine_dir, threads=1)
    assert again.path == cached
    assert 'export' not in caplog.text


@pytest.mark.slow  # exports the encoder
def test_corrupt_cached_export_is_repaired_for_ensure_onnx(tmp_path: Path,
                                                           exported: bytes) -> None:
    """ensure_onnx (the TensorRT backend's and malmm-export's ONNX file) repairs it too."""
    cached = _cache_with(tmp_path / 'engines', CORRUPTIONS['truncated'](exported))
    assert ensure_onnx(None, tmp_path / 'engines') == cached
    assert cached.read_bytes() == exported


@pytest.mark.slow  # exports the encoder
def test_cached_export_that_fails_twice_names_both_reasons(tmp_path: Path,
                                                           exported: bytes) -> None:
    loads: list[bytes] = []

    def reject(path: Path) -> None:  # a loader that cannot use any file, e.g. a broken runtime
        loads.append(path.read_bytes())
        raise RuntimeError(f'refused, attempt {len(loads)}')

    cached = _cache_with(tmp_path / 'engines', b'garbage')
    with pytest.raises(CheckpointError) as info:
        open_onnx(None, tmp_path / 'engines', reject)
    message = str(info.value)
    assert str(cached) in message and '\n' not in message
    assert 'refused, attempt 2' in message and 'refused, attempt 1' in message
    assert loads == [b'garbage', exported]  # exported again exactly once
    assert cached.read_bytes() == exported


# --------------------------------------------------------------------------------------------
# A user's ONNX file is never overwritten
# --------------------------------------------------------------------------------------------


USER_FILE_CALLS = {
    'create_encoder': lambda mine, engine_dir: create_encoder('onnxruntime', onnx_path=mine,
                                                              engine_dir=engine_dir),
    'ensure_onnx': lambda mine, engine_dir: ensure_onnx(mine, engine_dir),
}


@pytest.mark.parametrize('call', sorted(USER_FILE_CALLS))
@pytest.mark.parametrize('corruption', ['truncated', 'garbage'])
def test_corrupt_user_onnx_file_is_refused_and_left_alone(
    corruption: str, call: str, tmp_path: Path, default_dir: Path, exported: bytes
) -> None:
    mine = tmp_path / 'mine.onnx'
    bad = CORRUPTIONS[corruption](exported)
    mine.write_bytes(bad)
    engine_dir = tmp_path / 'engines'
    with pytest.raises(CheckpointError, match=re.escape(str(mine))) as info:
        USER_FILE_CALLS[call](mine, engine_dir)
    assert 'not re-exported' in str(info.value)
    assert mine.read_bytes() == bad
    assert not engine_dir.exists() and not default_dir.exists()


# --------------------------------------------------------------------------------------------
# Unusable cache folders: one ConfigError naming the folder and the reason
# --------------------------------------------------------------------------------------------

# engine_dir relative to tmp_path, text of the reason
BAD_DIRS = {
    'parent_is_a_file': ('blocker/engines', 'Not a directory'),
    'ancestor_is_a_file': ('blocker/a/b', 'Not a directory'),
    'is_a_file': ('blocker', 'exists and is not a folder'),
}


def _assert_one_line_naming(exc: BaseException, folder: Path, reason: str) -> None:
    message = str(exc)
    assert f'engine_dir {folder}:' in message, message
    assert reason in message and '$MALMM_ENGINE_DIR' in message, message
    assert '\n' not in message


BAD_DIR_CALLS = {
    'create_encoder': lambda engine_dir: create_encoder('onnxruntime', engine_dir=engine_dir),
    'ensure_onnx': lambda engine_dir: ensure_onnx(None, engine_dir),
    'ensure_cache_dir': ensure_cache_dir,
}


@pytest.mark.parametrize('call', sorted(BAD_DIR_CALLS))
@pytest.mark.parametrize('case', sorted(BAD_DIRS))
def test_unusable_engine_dir_is_a_config_error_naming_it(
    case: str, call: str, tmp_path: Path, blocker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    relative, reason = BAD_DIRS[case]
    monkeypatch.chdir(tmp_path)  # a relative engine_dir is reported as the absolute path
    with pytest.raises(ConfigError) as info:
        BAD_DIR_CALLS[call](relative)
    _assert_one_line_naming(info.value, tmp_path.resolve() / relative, reason)
    assert blocker.read_text() == 'a file, not a folder\n'


def test_unusable_default_folder_is_a_config_error_naming_it(
    blocker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv('MALMM_ENGINE_DIR', str(blocker / 'engines'))
    with pytest.raises(ConfigError) as info:
        create_encoder('onnxruntime')
    _assert_one_line_naming(info.value, blocker / 'engines', 'Not a directory')


@pytest.mark.skipif(os.geteuid() == 0, reason='root ignores folder permissions')
def test_folder_without_permission_is_a_config_error(tmp_path: Path) -> None:
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o500)  # no write: nothing can be created inside
    unreadable = tmp_path / 'unreadable'
    unreadable.mkdir(mode=0o000)
    try:
        with pytest.raises(ConfigError) as info:
            ensure_onnx(None, locked / 'engines')
        _assert_one_line_naming(info.value, locked / 'engines', 'Permission denied')
        with pytest.raises(ConfigError) as info:
            ensure_onnx(None, unreadable)
        _assert_one_line_naming(info.value, unreadable, 'permission denied')
    finally:
        locked.chmod(0o700)
        unreadable.chmod(0o700)


@pytest.mark.slow  # exports the encoder
def test_export_that_cannot_be_written_into_the_cache_names_it(tmp_path: Path) -> None:
    engine_dir = tmp_path / 'engines'
    (engine_dir / ONNX_FILENAME).mkdir(parents=True)  # renaming onto a folder fails
    with pytest.raises(ConfigError) as info:
        create_encoder('onnxruntime', engine_dir=engine_dir)
    message = str(info.value)
    assert f'cannot write the ONNX export {engine_dir / ONNX_FILENAME}' in message
    assert '$MALMM_ENGINE_DIR' in message and '\n' not in message
    assert _names(engine_dir) == {ONNX_FILENAME}  # no temp file left behind


# --------------------------------------------------------------------------------------------
# export_onnx writes atomically
# --------------------------------------------------------------------------------------------


def test_export_under_a_file_is_a_config_error(blocker: Path) -> None:
    target = blocker / 'encoder.onnx'
    with pytest.raises(ConfigError, match=re.escape(str(target))):
        export_onnx(target)


@pytest.mark.slow  # exports the encoder
def test_failed_export_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / 'encoder.onnx'
    target.mkdir()  # the final rename fails after the graph was written
    with pytest.raises(ConfigError, match=re.escape(str(target))):
        export_onnx(target)
    assert _names(tmp_path) == {'encoder.onnx'}
    assert target.is_dir() and not any(target.iterdir())


_CHILD = '''
import sys, time
from pathlib import Path
import numpy as np
import malmm_ros.runtime.onnxruntime_encoder  # imports done before the start line
from malmm_ros.runtime import create_encoder
cache, ready, go = map(Path, sys.argv[1:])
ready.touch()
deadline = time.monotonic() + 300
while not go.exists():
    if time.monotonic() > deadline:
        sys.exit('no start signal')
    time.sleep(0.01)
encoder = create_encoder('onnxruntime', engine_dir=cache, threads=1)
print(encoder.run(np.zeros((1, 224, 224, 3), np.uint8)).shape)
'''


@pytest.mark.slow  # two processes, each exporting the encoder
def test_two_processes_exporting_into_one_cache_both_get_a_whole_file(
    tmp_path: Path, exported: bytes
) -> None:
    cache, go = tmp_path / 'engines', tmp_path / 'go'
    env = dict(os.environ, OMP_NUM_THREADS='1')
    readies = [tmp_path / f'ready{i}' for i in range(2)]
    children = [subprocess.Popen([sys.executable, '-c', _CHILD, str(cache), str(ready), str(go)],
                                 cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for ready in readies]
    try:
        deadline = time.monotonic() + 300
        while not all(ready.exists() for ready in readies):
            assert all(child.poll() is None for child in children), 'a child died at start'
            assert time.monotonic() < deadline, 'children did not start'
            time.sleep(0.05)
        go.touch()  # both find no cached file and export at the same time
        results = [child.communicate(timeout=300) for child in children]
    finally:
        for child in children:
            child.kill()
    for child, (out, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err[-3000:]
        assert out.strip() == '(1, 49, 1280)'
    assert _names(cache) == {ONNX_FILENAME}
    assert (cache / ONNX_FILENAME).read_bytes() == exported
