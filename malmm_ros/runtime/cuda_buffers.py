"""The few CUDA runtime calls the TensorRT step needs, through ctypes: no torch, no pycuda.

A robot has libcudart (JetPack on a Jetson; the CUDA toolkit or the nvidia-cuda-runtime wheel
elsewhere) but often neither torch nor pycuda. The library is found on first use: the linker's
name for it, then the usual sonames, then $CUDA_HOME, $CUDA_PATH, /usr/local/cuda and the pip
wheel's folder. Its absence is a ConfigError saying what to install; a failing call is a
CudaError naming the call and CUDA's error.

Copies use ordinary (pageable) numpy memory: CUDA stages it, so a host array may be reused as
soon as an upload returns, and a download is complete once the stream is synchronized.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from malmm_ros.errors import ConfigError, MalmmError

__all__ = ['CUDA_HINT', 'CudaError', 'CudaRuntime', 'DeviceArray', 'cuda_runtime',
           'library_candidates', 'release_all']

CUDA_HINT = ('install the CUDA runtime (JetPack on a Jetson; the CUDA toolkit or pip install '
             'nvidia-cuda-runtime-cu12 elsewhere) or point CUDA_HOME at it')
_HOST_TO_DEVICE, _DEVICE_TO_HOST = 1, 2  # cudaMemcpyKind
_CC_MAJOR, _CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor / Minor
# cudaDeviceProp grows with CUDA versions; its first field, char name[256], never moved.
_PROPERTIES_BYTES = 1 << 14


class CudaError(MalmmError):
    """A CUDA runtime call failed (no driver, no device, out of memory ...)."""


def library_candidates() -> list[str]:
    """Names and paths libcudart may be loaded from, most likely first, without duplicates."""
    found = ctypes.util.find_library('cudart')
    names = [found] if found else []
    names += ['libcudart.so', 'libcudart.so.13', 'libcudart.so.12', 'libcudart.so.11.0']
    folders = [Path(os.environ[v]) / sub for v in ('CUDA_HOME', 'CUDA_PATH') if os.environ.get(v)
               for sub in ('lib64', 'lib')]
    folders += [Path('/usr/local/cuda/lib64')]
    folders += [Path(entry) / 'nvidia' / 'cuda_runtime' / 'lib' for entry in sys.path if entry]
    for folder in folders:
        if folder.is_dir():
            names += [str(p) for p in sorted(folder.glob('libcudart.so*'), reverse=True)]
    return list(dict.fromkeys(names))


class CudaRuntime:
    """libcudart with the prototypes of the calls used here, each checked."""

    def __init__(self, library: ctypes.CDLL, path: str) -> None:
        self.path = path
        self._lib = library
        c_int_p, c_void_pp = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_void_p)
        prototypes = {
            'cudaGetErrorName': (ctypes.c_char_p, [ctypes.c_int]),
            'cudaGetErrorString': (ctypes.c_char_p, [ctypes.c_int]),
            'cudaGetDeviceCount': (ctypes.c_int, [c_int_p]),
            'cudaDeviceGetAttribute': (ctypes.c_int, [c_int_p, ctypes.c_int, ctypes.c_int]),
            'cudaMalloc': (ctypes.c_int, [c_void_pp, ctypes.c_size_t]),
            'cudaFree': (ctypes.c_int, [ctypes.c_void_p]),
            'cudaMemcpyAsync': (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                               ctypes.c_int, ctypes.c_void_p]),
            'cudaStreamCreate': (ctypes.c_int, [c_void_pp]),
            'cudaStreamSynchronize': (ctypes.c_int, [ctypes.c_void_p]),
            'cudaStreamDestroy': (ctypes.c_int, [ctypes.c_void_p]),
        }
        for name, (restype, argtypes) in prototypes.items():
            try:
                function = getattr(library, name)
            except AttributeError:
                raise ConfigError(f'{path} has no {name}: not a CUDA runtime library; '
                                  f'{CUDA_HINT}') from None
            function.restype, function.argtypes = restype, argtypes
        # CUDA 12 names the current layout ..._v2; CUDA 11 and 13 have only the plain name.
        self._properties = getattr(library, 'cudaGetDeviceProperties_v2', None) or \
            library.cudaGetDeviceProperties
        self._properties.restype = ctypes.c_int
        self._properties.argtypes = [ctypes.c_void_p, ctypes.c_int]

    def check(self, status: int, call: str) -> None:
        """CudaError naming `call` and CUDA's error unless `status` is cudaSuccess."""
        if status:
            name = (self._lib.cudaGetErrorName(status) or b'unknown').decode()
            text = (self._lib.cudaGetErrorString(status) or b'').decode()
            raise CudaError(f'{call} failed: {name} ({text})')

    def device_count(self) -> int:
        count = ctypes.c_int(0)
        self.check(self._lib.cudaGetDeviceCount(ctypes.byref(count)), 'cudaGetDeviceCount')
        return count.value

    def device_name(self, device: int = 0) -> str:
        properties = ctypes.create_string_buffer(_PROPERTIES_BYTES)
        self.check(self._properties(properties, device), 'cudaGetDeviceProperties')
        return properties.value.decode(errors='replace')  # up to the name's NUL

    def compute_capability(self, device: int = 0) -> str:
        """'major.minor', e.g. '8.7' for Orin."""
        values = []
        for attribute in (_CC_MAJOR, _CC_MINOR):
            value = ctypes.c_int(0)
            self.check(self._lib.cudaDeviceGetAttribute(ctypes.byref(value), attribute, device),
                       'cudaDeviceGetAttribute')
            values.append(value.value)
        return '{}.{}'.format(*values)

    def malloc(self, nbytes: int) -> int:
        pointer = ctypes.c_void_p()
        self.check(self._lib.cudaMalloc(ctypes.byref(pointer), nbytes), f'cudaMalloc({nbytes})')
        return int(pointer.value or 0)

    def free(self, pointer: int) -> None:
        self.check(self._lib.cudaFree(pointer), 'cudaFree')

    def create_stream(self) -> int:
        stream = ctypes.c_void_p()
        self.check(self._lib.cudaStreamCreate(ctypes.byref(stream)), 'cudaStreamCreate')
        return int(stream.value or 0)

    def synchronize(self, stream: int) -> None:
        self.check(self._lib.cudaStreamSynchronize(stream), 'cudaStreamSynchronize')

    def destroy_stream(self, stream: int) -> None:
        self.check(self._lib.cudaStreamDestroy(stream), 'cudaStreamDestroy')

    def copy(self, destination: int, source: int, nbytes: int, kind: int, stream: int) -> None:
        self.check(self._lib.cudaMemcpyAsync(destination, source, nbytes, kind, stream),
                   'cudaMemcpyAsync')


def _open(candidates: Sequence[str]) -> CudaRuntime:
    tried = []
    for candidate in candidates:
        try:
            return CudaRuntime(ctypes.CDLL(candidate), candidate)
        except (OSError, ConfigError) as exc:  # not there, or not a CUDA runtime: go on
            tried.append(f'{candidate} ({exc})' if os.sep in candidate else candidate)
    raise ConfigError(f'the CUDA runtime library (libcudart) is not found (tried '
                      f'{", ".join(tried) or "nothing"}); {CUDA_HINT}')


@functools.cache
def _default() -> CudaRuntime:
    return _open(library_candidates())


def cuda_runtime(candidates: Sequence[str] | None = None) -> CudaRuntime:
    """libcudart from `candidates` (default: `library_candidates()`, loaded once per process);
    ConfigError with what to install when none loads."""
    return _default() if candidates is None else _open(candidates)


class DeviceArray:
    """One device allocation for an array of fixed shape and dtype; `release()` frees it."""

    def __init__(self, cuda: CudaRuntime, shape: Sequence[int], dtype: np.dtype) -> None:
        self.cuda = cuda
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.pointer = cuda.malloc(max(self.nbytes, 1))  # cudaMalloc(0) may give no pointer

    def upload(self, array: np.ndarray, stream: int) -> None:
        """Queue a copy of `array` (C-contiguous, this shape and dtype) onto the device."""
        if array.shape != self.shape or array.dtype != self.dtype \
                or not array.flags.c_contiguous:
            raise ValueError(f'array {array.shape} {array.dtype} does not fit the device '
                             f'buffer {self.shape} {self.dtype} (or is not contiguous)')
        self.cuda.copy(self.pointer, array.ctypes.data, self.nbytes, _HOST_TO_DEVICE, stream)

    def download(self, stream: int) -> np.ndarray:
        """A new host array the device's contents are copied into: whole once `stream` is
        synchronized."""
        out = np.empty(self.shape, self.dtype)
        self.cuda.copy(out.ctypes.data, self.pointer, self.nbytes, _DEVICE_TO_HOST, stream)
        return out

    def release(self) -> None:
        if self.pointer:
            pointer, self.pointer = self.pointer, 0
            self.cuda.free(pointer)


def release_all(cuda: CudaRuntime, buffers: Sequence[DeviceArray], stream: int,
                what: str) -> None:
    """Free `buffers` and `stream` once nothing uses them (a runner's close(), or its garbage
    collection); a CUDA that is already shut down (interpreter exit) is only logged."""
    try:
        cuda.synchronize(stream)  # nothing may still read or write them
        for buffer in buffers:
            buffer.release()
        cuda.destroy_stream(stream)
    except CudaError as exc:
        logging.getLogger(__name__).debug('releasing %s buffers: %s', what, exc)
