"""EngineCache and EngineKey on real files: cache hits, misses after upgrades, rebuilds, atomicity.

No TensorRT here: `build` and `deserialize` are plain functions over bytes, which is all the cache
sees of TensorRT. A tiny real ONNX export provides the bytes that are hashed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from malmm_ros.errors import CheckpointError, ConfigError
from malmm_ros.runtime.engine_cache import EngineCache, EngineKey, ensure_cache_dir, onnx_sha256

MAGIC = b'TEST-ENGINE\x00'  # what the test "runtime" accepts as a serialized engine
SHA = '3fa2c0d9e1b7' + '0' * 52


class _TinyEncoder(nn.Module):
    """Stand-in with the encoder's ONNX interface: uint8 'frames' in, float 'tokens' out."""

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return (frames.float() / 255.0).mean(dim=(1, 2)).unsqueeze(1)  # [B, 1, 3]


@pytest.fixture(scope='module')
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp('onnx') / 'tiny.onnx'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # the legacy exporter is fine here
        torch.onnx.export(
            _TinyEncoder(), (torch.zeros(1, 8, 8, 3, dtype=torch.uint8),), str(path),
            dynamo=False, opset_version=17, input_names=['frames'], output_names=['tokens'],
            dynamic_axes={'frames': {0: 'batch'}, 'tokens': {0: 'batch'}},
        )
    return path


@pytest.fixture
def key(onnx_file: Path) -> EngineKey:
    return EngineKey(
        onnx_sha256=onnx_sha256(onnx_file),
        tensorrt_version='10.3.0',
        gpu_name='NVIDIA Orin',
        compute_capability='8.7',
        precision='fp16',
        input_shape=(1, 224, 224, 3),
    )


def parse_engine(data: bytes) -> dict[str, bytes]:
    """The test runtime: accepts MAGIC-prefixed bytes, raises on anything else (a corrupt plan)."""
    if not data.startswith(MAGIC):
        raise ValueError('not a serialized engine')
    return {'payload': data[len(MAGIC):]}


class CountingBuilder:
    """build() callable that records how often the cache asked for a build."""

    def __init__(self, payload: bytes = b'v1') -> None:
        self.payload = payload
        self.calls = 0

    def __call__(self) -> bytes:
        self.calls += 1
        return MAGIC + self.payload


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


# --------------------------------------------------------------------------------------------
# EngineKey
# --------------------------------------------------------------------------------------------


def test_filename_is_readable() -> None:
    key = EngineKey(SHA, '10.3.0', 'NVIDIA Orin', '8.7', 'fp16', (1, 224, 224, 3))
    assert key.filename() == (
        'efficientnet_lite0-3fa2c0d9e1b7-trt10.3.0-nvidia-orin-sm87-fp16-1x224x224x3.engine'
    )
    assert key.filename(stem='other model').startswith('other-model-3fa2c0d9e1b7-')


@pytest.mark.parametrize('gpu_name', [
    'NVIDIA GeForce RTX 4090',
    'Orin (nvgpu)/SoC',
    '../../etc/passwd',
    'Tesla V100-SXM2-16GB',
    'NVIDIA\\Windows:GPU*?',
    '.hidden',
])
def test_filename_is_filesystem_safe(gpu_name: str, tmp_path: Path) -> None:
    name = EngineKey(SHA, '10.3.0', gpu_name, '8.7', 'fp16', (1, 224, 224, 3)).filename()
    assert re.fullmatch(r'[a-z0-9_][a-z0-9._-]*\.engine', name), name
    assert (tmp_path / name).parent == tmp_path  # no separators, no traversal
    assert ' ' not in name and '/' not in name and '\\' not in name


def test_filenames_differ_whenever_a_field_differs() -> None:
    base = EngineKey(SHA, '10.3.0', 'NVIDIA Orin', '8.7', 'fp16', (1, 224, 224, 3))
    variants = [
        base,
        dataclasses.replace(base, onnx_sha256='0' * 64),
        dataclasses.replace(base, tensorrt_version='10.7.0'),
        dataclasses.replace(base, gpu_name='NVIDIA GeForce RTX 3060'),
        dataclasses.replace(base, compute_capability='8.6'),
        dataclasses.replace(base, precision='int8'),
        dataclasses.replace(base, input_shape=(4, 224, 224, 3)),
    ]
    assert len({k.filename() for k in variants}) == len(variants)


def test_key_json_round_trip(key: EngineKey) -> None:
    data = json.loads(json.dumps(key.to_dict()))
    assert data['input_shape'] == [1, 224, 224, 3]
    back = EngineKey.from_dict(data)
    assert back == key
    assert isinstance(back.input_shape, tuple)


@pytest.mark.parametrize(('field', 'value'), [
    ('onnx_sha256', 'abc'),
    ('onnx_sha256', 'G' * 64),
    ('tensorrt_version', ''),
    ('gpu_name', '  '),
    ('compute_capability', 'sm87'),
    ('precision', 'bf16'),
    ('input_shape', ()),
    ('input_shape', (1, 0, 224, 3)),
    ('input_shape', (1, 224.0, 224, 3)),
])
def test_key_rejects_bad_values(key: EngineKey, field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(key, **{field: value})


def test_from_dict_names_missing_and_unexpected_fields(key: EngineKey) -> None:
    data = key.to_dict()
    del data['gpu_name']
    data['driver'] = '540'
    with pytest.raises(CheckpointError, match=r"missing \['gpu_name'\].*unexpected \['driver'\]"):
        EngineKey.from_dict(data)


# --------------------------------------------------------------------------------------------
# onnx_sha256
# --------------------------------------------------------------------------------------------


def test_onnx_sha256_matches_hashlib(onnx_file: Path) -> None:
    assert onnx_sha256(onnx_file) == hashlib.sha256(onnx_file.read_bytes()).hexdigest()


def test_onnx_sha256_of_a_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / 'nope.onnx'
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        onnx_sha256(missing)


# --------------------------------------------------------------------------------------------
# ensure_cache_dir
# --------------------------------------------------------------------------------------------


def test_ensure_cache_dir_creates_it_and_returns_it_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = ensure_cache_dir(Path('a') / 'b' / 'engines')
    assert folder.is_absolute() and folder.is_dir()
    assert folder == tmp_path.resolve() / 'a' / 'b' / 'engines'
    (folder / 'kept.engine').write_bytes(b'x')
    assert ensure_cache_dir(str(folder)) == folder  # an existing folder is left as it is
    assert (folder / 'kept.engine').read_bytes() == b'x'


@pytest.mark.parametrize(('relative', 'action', 'reason'), [
    ('blocker/engines', 'create', 'Not a directory'),
    ('blocker', 'use', 'it exists and is not a folder'),
])
def test_ensure_cache_dir_names_the_folder_and_the_reason(
    tmp_path: Path, relative: str, action: str, reason: str
) -> None:
    (tmp_path / 'blocker').write_text('a file')
    folder = tmp_path / relative
    with pytest.raises(ConfigError) as info:
        ensure_cache_dir(folder)
    assert str(info.value) == (
        f'engine_dir {folder}: cannot {action} the encoder cache ({reason}); set engine_dir or '
        '$MALMM_ENGINE_DIR to a writable folder'
    )


@pytest.mark.skipif(os.geteuid() == 0, reason='root ignores folder permissions')
def test_ensure_cache_dir_refuses_a_folder_it_cannot_read(tmp_path: Path) -> None:
    folder = tmp_path / 'locked'
    folder.mkdir(mode=0o000)
    try:
        with pytest.raises(ConfigError, match=re.escape(f'{folder}: cannot read')):
            ensure_cache_dir(folder)
    finally:
        folder.chmod(0o700)


# --------------------------------------------------------------------------------------------
# lookup / store
# --------------------------------------------------------------------------------------------


def test_lookup_hit_and_sidecar_contents(key: EngineKey, tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / 'engines')
    assert cache.lookup(key) is None  # the folder does not even exist yet
    stored = cache.store(key, MAGIC + b'v1', {'workspace_bytes': 1 << 30, 'max_batch': 1})
    engine, sidecar = cache.paths(key)
    assert stored == engine
    assert sidecar.name == engine.name + '.json'
    assert cache.lookup(key) == engine
    record = json.loads(sidecar.read_text())
    assert EngineKey.from_dict(record['key']) == key
    assert record['build'] == {'workspace_bytes': 1 << 30, 'max_batch': 1}
    assert record['created']
    assert record['engine_sha256'] == hashlib.sha256(MAGIC + b'v1').hexdigest()


FIELD_CHANGES = {  # "the TensorRT/JetPack/GPU/config changed since the engine was built"
    'onnx_sha256': 'f' * 64,
    'tensorrt_version': '10.7.0',
    'gpu_name': 'NVIDIA Jetson AGX Orin',
    'compute_capability': '8.6',
    'precision': 'fp32',
    'input_shape': (2, 224, 224, 3),
}


@pytest.mark.parametrize('field', sorted(FIELD_CHANGES))
def test_lookup_misses_when_any_key_field_differs(
    key: EngineKey, tmp_path: Path, field: str
) -> None:
    cache = EngineCache(tmp_path)
    cache.store(key, MAGIC + b'v1')
    changed = dataclasses.replace(key, **{field: FIELD_CHANGES[field]})
    assert cache.lookup(changed) is None
    assert cache.lookup(key) is not None  # the old engine is untouched


@pytest.mark.parametrize(('field', 'value'), [
    ('onnx_sha256', SHA[:12] + 'f' * 52),  # same 12-digit prefix in the name
    ('gpu_name', 'nvidia  ORIN'),  # same slug in the name
])
def test_lookup_compares_the_full_key_not_the_file_name(
    field: str, value: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stored = EngineKey(SHA, '10.3.0', 'NVIDIA Orin', '8.7', 'fp16', (1, 224, 224, 3))
    asked = dataclasses.replace(stored, **{field: value})
    cache = EngineCache(tmp_path)
    cache.store(stored, MAGIC + b'v1')
    assert cache.paths(asked) == cache.paths(stored)
    with caplog.at_level(logging.WARNING):
        assert cache.lookup(asked) is None
    assert field in caplog.text and 'another configuration' in caplog.text


@pytest.mark.parametrize('sidecar_text', [
    None,  # missing
    '{not json',
    '[]',
    '{"key": {}}',
    '{"key": {"onnx_sha256": 1}}',
])
def test_lookup_misses_without_a_usable_sidecar(
    key: EngineKey, tmp_path: Path, sidecar_text: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    cache = EngineCache(tmp_path)
    cache.store(key, MAGIC + b'v1')
    _, sidecar = cache.paths(key)
    if sidecar_text is None:
        sidecar.unlink()
    else:
        sidecar.write_text(sidecar_text)
    with caplog.at_level(logging.WARNING):
        assert cache.lookup(key) is None
    assert sidecar.name in caplog.text


def test_lookup_misses_when_the_engine_changed_after_store(
    key: EngineKey, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = EngineCache(tmp_path)
    engine = cache.store(key, MAGIC + b'v1')
    engine.write_bytes(MAGIC + b'v2')  # same size, other bytes
    with caplog.at_level(logging.WARNING):
        assert cache.lookup(key) is None
    assert 'sha256' in caplog.text


def test_store_leaves_no_temp_files(key: EngineKey, tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.store(key, MAGIC + b'v1')
    cache.store(key, MAGIC + b'v2')  # overwrite
    engine, sidecar = cache.paths(key)
    assert _files(tmp_path) == {engine.name, sidecar.name}
    assert engine.read_bytes() == MAGIC + b'v2'
    assert cache.lookup(key) == engine


def test_stored_files_get_the_umask_permissions(key: EngineKey, tmp_path: Path) -> None:
    """Readable by the other users of a shared cache, as any file the user writes."""
    old_umask = os.umask(0o022)
    try:
        engine = EngineCache(tmp_path).store(key, MAGIC + b'v1')
    finally:
        os.umask(old_umask)
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o644}
    assert engine.exists()


def test_failed_store_leaves_no_temp_file_and_no_sidecar(key: EngineKey, tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    engine, sidecar = cache.paths(key)
    engine.mkdir()  # os.replace onto a directory fails
    with pytest.raises(OSError):
        cache.store(key, MAGIC + b'v1')
    assert _files(tmp_path) == {engine.name}
    assert not sidecar.exists()
    assert cache.lookup(key) is None


# --------------------------------------------------------------------------------------------
# load_or_build
# --------------------------------------------------------------------------------------------


def test_load_or_build_builds_once_then_hits(key: EngineKey, tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    build = CountingBuilder()
    first = cache.load_or_build(key, build, parse_engine, info={'max_batch': 1})
    second = cache.load_or_build(key, build, parse_engine)
    third = EngineCache(tmp_path).load_or_build(key, build, parse_engine)  # a new process
    assert first == second == third == {'payload': b'v1'}
    assert build.calls == 1
    assert json.loads(cache.paths(key)[1].read_text())['build'] == {'max_batch': 1}


@pytest.mark.parametrize('corrupt', [b'garbage from an old TensorRT', MAGIC + b'NONE'])
def test_engine_that_fails_to_deserialize_is_rebuilt_once(
    key: EngineKey, tmp_path: Path, corrupt: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    def deserialize(data: bytes) -> dict[str, bytes] | None:
        engine = parse_engine(data)  # raises on garbage
        return None if engine['payload'] == b'NONE' else engine  # TensorRT's "None" failure

    cache = EngineCache(tmp_path)
    cache.store(key, corrupt)  # intact on disk, but this runtime cannot load it
    build = CountingBuilder(b'v2')
    with caplog.at_level(logging.WARNING):
        engine = cache.load_or_build(key, build, deserialize)
    assert engine == {'payload': b'v2'}
    assert build.calls == 1
    engine_path = cache.paths(key)[0]
    assert engine_path.read_bytes() == MAGIC + b'v2'  # the new engine replaced the old one
    assert f'engine {engine_path} failed to deserialize (stale or corrupt): rebuilding' in (
        caplog.text
    )
    assert cache.load_or_build(key, build, deserialize) == {'payload': b'v2'}
    assert build.calls == 1


def test_engine_corrupted_on_disk_is_rebuilt_without_deserializing_it(
    key: EngineKey, tmp_path: Path
) -> None:
    seen: list[bytes] = []

    def deserialize(data: bytes) -> dict[str, bytes]:
        seen.append(data)
        return parse_engine(data)

    cache = EngineCache(tmp_path)
    engine_path = cache.store(key, MAGIC + b'v1')
    engine_path.write_bytes(MAGIC + b'v1'[:1])  # truncated (e.g. disk full while copying)
    build = CountingBuilder(b'v2')
    assert cache.load_or_build(key, build, deserialize) == {'payload': b'v2'}
    assert build.calls == 1
    assert seen == [MAGIC + b'v2']


def test_build_failure_raises_checkpoint_error_with_the_cause(
    key: EngineKey, tmp_path: Path
) -> None:
    def build() -> bytes:
        raise RuntimeError('out of GPU memory')

    cache = EngineCache(tmp_path)
    with pytest.raises(CheckpointError, match='out of GPU memory') as info:
        cache.load_or_build(key, build, parse_engine)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert key.filename() in str(info.value)
    assert not tmp_path.exists() or _files(tmp_path) == set()


def test_build_config_errors_pass_through(key: EngineKey, tmp_path: Path) -> None:
    def build() -> bytes:
        raise ConfigError('int8 needs calibration frames')

    with pytest.raises(ConfigError, match='calibration frames'):
        EngineCache(tmp_path).load_or_build(key, build, parse_engine)


@pytest.mark.parametrize('result', [b'', None])
def test_build_without_bytes_is_a_checkpoint_error(
    key: EngineKey, tmp_path: Path, result: bytes | None
) -> None:
    with pytest.raises(CheckpointError, match='no engine bytes'):
        EngineCache(tmp_path).load_or_build(key, lambda: result, parse_engine)


def test_fresh_engine_that_fails_to_deserialize_is_not_stored(
    key: EngineKey, tmp_path: Path
) -> None:
    build = CountingBuilder()
    with pytest.raises(CheckpointError, match='freshly built engine .* failed to deserialize'):
        EngineCache(tmp_path).load_or_build(key, build, lambda data: None)
    assert build.calls == 1
    assert _files(tmp_path) == set()


def test_unwritable_cache_still_returns_the_engine(
    key: EngineKey, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_folder = tmp_path / 'file'
    not_a_folder.write_text('a file where the cache folder should be')
    build = CountingBuilder()
    with caplog.at_level(logging.WARNING):
        engine = EngineCache(not_a_folder).load_or_build(key, build, parse_engine)
    assert engine == {'payload': b'v1'}
    assert 'could not cache engine' in caplog.text


# --------------------------------------------------------------------------------------------
# stale
# --------------------------------------------------------------------------------------------


def test_stale_lists_engines_of_the_same_onnx_built_for_something_else(
    key: EngineKey, tmp_path: Path
) -> None:
    cache = EngineCache(tmp_path)
    old_trt = dataclasses.replace(key, tensorrt_version='8.6.1')
    other_gpu = dataclasses.replace(key, gpu_name='NVIDIA GeForce RTX 3060',
                                    compute_capability='8.6')
    other_precision = dataclasses.replace(key, precision='fp32')
    other_onnx = dataclasses.replace(key, onnx_sha256='e' * 64, tensorrt_version='8.6.1')
    other_batch = dataclasses.replace(key, input_shape=(4, 224, 224, 3))
    for k in (key, old_trt, other_gpu, other_precision, other_onnx, other_batch):
        cache.store(k, MAGIC + k.filename().encode())
    (tmp_path / 'notes.txt').write_text('a user file')
    (tmp_path / 'broken.engine').write_bytes(b'no sidecar')
    (tmp_path / 'broken2.engine').write_bytes(b'bad sidecar')
    (tmp_path / 'broken2.engine.json').write_text('{oops')

    stale = cache.stale(key)
    assert stale == sorted(cache.paths(k)[0] for k in (old_trt, other_gpu, other_precision))
    assert cache.stale(old_trt) == sorted(
        cache.paths(k)[0] for k in (key, other_gpu, other_precision, other_batch)
    )
    # Reporting deletes nothing.
    assert all(p.exists() for p in stale)
    assert (tmp_path / 'notes.txt').exists() and (tmp_path / 'broken.engine').exists()


def test_stale_of_a_missing_folder_is_empty(key: EngineKey, tmp_path: Path) -> None:
    assert EngineCache(tmp_path / 'nothing').stale(key) == []
