"""The ctypes CUDA runtime binding: clear errors where libcudart or a GPU is missing (here), and
device copies that round-trip where a GPU is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from malmm_ros.errors import ConfigError
from malmm_ros.runtime.cuda_buffers import (
    CUDA_HINT,
    CudaError,
    CudaRuntime,
    DeviceArray,
    cuda_runtime,
    library_candidates,
)


def _runtime_or_none() -> CudaRuntime | None:
    try:
        return cuda_runtime()
    except ConfigError:
        return None


def _gpu_or_skip() -> CudaRuntime:
    cuda = _runtime_or_none()
    if cuda is None:
        pytest.skip('no libcudart on this machine')
    try:
        if cuda.device_count() > 0:
            return cuda
    except CudaError as exc:
        pytest.skip(f'libcudart loads but CUDA has no usable GPU here: {exc}')
    pytest.skip('libcudart loads but sees no GPU')


def test_a_missing_library_is_a_config_error_saying_what_to_install() -> None:
    with pytest.raises(ConfigError, match='libcudart.*not found.*libcudart-missing.so.0') as info:
        cuda_runtime(['libcudart-missing.so.0'])
    assert CUDA_HINT in str(info.value)


def test_a_file_that_is_not_a_library_is_skipped_naming_why(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """$CUDA_HOME is searched; a broken file there is reported with the loader's reason, and
    the search goes on to the next candidate."""
    (tmp_path / 'lib64').mkdir()
    fake = tmp_path / 'lib64' / 'libcudart.so.12'
    fake.write_bytes(b'not an ELF file')
    monkeypatch.setenv('CUDA_HOME', str(tmp_path))
    candidates = library_candidates()
    assert str(fake) in candidates
    with pytest.raises(ConfigError, match=f'{fake} \\(.*\\)'):
        cuda_runtime([str(fake), 'libcudart-missing.so.0'])


def test_calls_without_a_gpu_name_the_call_and_cudas_error() -> None:
    """Where libcudart is installed but no driver or GPU is (this machine), the device count is
    a CudaError naming the call and CUDA's own error name."""
    cuda = _runtime_or_none()
    if cuda is None:
        pytest.skip('no libcudart on this machine')
    try:
        count = cuda.device_count()
    except CudaError as exc:
        assert 'cudaGetDeviceCount failed: cudaError' in str(exc)
    else:
        assert count >= 0


def test_device_arrays_round_trip() -> None:
    cuda = _gpu_or_skip()
    stream = cuda.create_stream()
    try:
        for dtype in (np.float32, np.int64, np.float16):
            values = np.arange(3 * 5 * 7).reshape(3, 5, 7).astype(dtype)
            buffer = DeviceArray(cuda, values.shape, values.dtype)
            buffer.upload(values, stream)
            back = buffer.download(stream)
            cuda.synchronize(stream)
            np.testing.assert_array_equal(back, values)
            with pytest.raises(ValueError, match='does not fit'):
                buffer.upload(values.T, stream)
            buffer.release()
            buffer.release()  # a second release is a no-op
        assert cuda.device_name() and cuda.compute_capability().count('.') == 1
    finally:
        cuda.destroy_stream(stream)
