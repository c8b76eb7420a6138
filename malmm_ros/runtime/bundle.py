"""A deployable bundle: one folder with everything a robot runs, and what it was made from.

    encoder.fp32.onnx    the image encoder, preprocessing folded in (runtime/onnx_export.py)
    encoder.int8.onnx    the same, statically quantized on real frames (runtime/quantize.py)
    projection.onnx      frame tokens -> visual bank rows     (runtime/step_export.py)
    step.onnx            banks -> query rows, query outputs, probabilities
    checkpoint.safetensors  the weights the graphs came from (runtime: torch runs these)
    calibration.npz      the uint8 frames [n, 224, 224, 3] the INT8 encoder was calibrated on,
                         for a TensorRT INT8 engine on the robot (read without unpickling)
    manifest.json        format, model config, step spec, label maps, protocol, trained flag,
                         sha256 and size of every file, exporter versions, calibration set

`malmm-export bundle` writes it (runtime/bundle_export.py, needs torch); this module reads it
without torch. Opening checks the manifest and every file's size and sha256 before anything
is loaded, so a truncated copy to the robot fails at start naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from malmm_ros.errors import CheckpointError, DataError
from malmm_ros.labels import LabelMaps
from malmm_ros.runtime.step_spec import StepSpec

__all__ = ['BUNDLE_CHECKPOINT', 'BUNDLE_FILES', 'BUNDLE_FORMAT', 'CALIBRATION_FILE',
           'ENCODER_FILES', 'MANIFEST', 'Bundle', 'file_digest', 'read_calibration',
           'write_calibration']

BUNDLE_FORMAT = 'malmm_ros/bundle/v1'
MANIFEST = 'manifest.json'
ENCODER_FILES = {'fp32': 'encoder.fp32.onnx', 'int8': 'encoder.int8.onnx'}
BUNDLE_CHECKPOINT = 'checkpoint.safetensors'
CALIBRATION_FILE = 'calibration.npz'
BUNDLE_FILES = (*ENCODER_FILES.values(), 'projection.onnx', 'step.onnx', BUNDLE_CHECKPOINT,
                CALIBRATION_FILE)
CALIBRATION_FRAME = (224, 224, 3)  # resize_and_crop's output
# A manifest is a few hundred kB (label names); anything far larger is not one.
_MAX_MANIFEST_BYTES = 16 << 20


def file_digest(path: Path) -> str:
    """sha256 hex of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open('rb') as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """An opened, checked bundle folder."""

    path: Path
    manifest: dict[str, Any]
    spec: StepSpec
    labels: LabelMaps
    trained: bool
    model: dict[str, Any]  # the model config as the checkpoint stores it (preset included)
    protocol: dict[str, Any]  # memory_bank_length, sample_fps ... it was trained with

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True) -> Bundle:
        """Read `path`/manifest.json and check it; with `verify`, each file's size and sha256
        too. CheckpointError naming the file and what is wrong."""
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise CheckpointError(f'bundle {folder} is not a folder (write one with '
                                  'malmm-export bundle --out DIR)')
        manifest = _read_manifest(folder / MANIFEST)
        where = f'bundle {folder}'
        if manifest.get('format') != BUNDLE_FORMAT:
            raise CheckpointError(f'{where}: manifest format {manifest.get("format")!r}, '
                                  f'expected {BUNDLE_FORMAT!r}')
        files = manifest.get('files')
        if not isinstance(files, dict) or set(files) != set(BUNDLE_FILES):
            listed = sorted(files) if isinstance(files, dict) else files
            raise CheckpointError(f'{where}: manifest lists files {listed}, expected '
                                  f'{sorted(BUNDLE_FILES)}')
        for name, entry in files.items():
            _check_file(folder / name, entry, verify, where)
        spec = StepSpec.from_json(manifest.get('step'), f'{where} manifest')
        try:
            labels = LabelMaps.from_dict(manifest.get('labels', {}), source=f'{where} labels')
        except DataError as exc:
            raise CheckpointError(str(exc)) from None
        trained, model = manifest.get('trained'), manifest.get('model')
        protocol = manifest.get('protocol', {})
        if not isinstance(trained, bool) or not isinstance(model, dict) or \
                not isinstance(protocol, dict):
            raise CheckpointError(f'{where}: manifest needs "trained" (true/false), "model" '
                                  'and "protocol" (objects)')
        if (labels.num_verbs, labels.num_nouns) == (0, 0):
            raise CheckpointError(f'{where}: manifest has no label maps')
        return cls(folder, manifest, spec, labels, trained, model, protocol)

    def file(self, name: str) -> Path:
        return self.path / name

    def encoder(self, precision: str) -> Path:
        """The encoder graph of `precision` (fp32 or int8)."""
        if precision not in ENCODER_FILES:
            raise CheckpointError(f'a bundle holds ONNX Runtime encoders in '
                                  f'{sorted(ENCODER_FILES)}, not {precision!r} (fp16 is a '
                                  'TensorRT precision)')
        return self.file(ENCODER_FILES[precision])

    def calibration_frames(self) -> np.ndarray:
        """The uint8 frames [n, 224, 224, 3] the INT8 encoder was calibrated on, n as the
        manifest says (CheckpointError otherwise)."""
        frames = read_calibration(self.file(CALIBRATION_FILE))
        calibration = self.manifest.get('calibration')
        expected = calibration.get('frames') if isinstance(calibration, dict) else None
        if len(frames) != expected:
            raise CheckpointError(f'bundle {self.path}: {CALIBRATION_FILE} holds {len(frames)} '
                                  f'frames, the manifest says {expected}')
        return frames


def write_calibration(path: Path, frames: np.ndarray) -> None:
    """Save uint8 frames [n, 224, 224, 3] as `read_calibration` reads them (no pickles)."""
    frames = np.asarray(frames)
    _check_frames(path, frames.dtype, frames.shape)
    np.savez_compressed(path, frames=frames)


def read_calibration(path: Path) -> np.ndarray:
    """The frames of a calibration file, after its header says uint8 [n, 224, 224, 3] (n >= 1):
    a wrong or pickled array is refused before any of its data is read."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
            if members != ['frames.npy']:
                raise CheckpointError(f'{path} holds {members}, expected only frames.npy')
            with archive.open('frames.npy') as member:
                version = np.lib.format.read_magic(member)
                readers = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}
                if version not in readers:
                    raise CheckpointError(f'{path}: frames.npy has format {version}, which '
                                          'np.save does not write for plain arrays')
                shape, fortran_order, dtype = readers[version](member)
        _check_frames(path, dtype, shape)
        if fortran_order:
            raise CheckpointError(f'{path}: frames are stored in Fortran order')
        with np.load(path, allow_pickle=False) as archive:
            return archive['frames']
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f'{path} is not a readable calibration file: {exc}') from None


def _check_frames(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    if dtype != np.uint8 or len(shape) != 4 or shape[1:] != CALIBRATION_FRAME or shape[0] < 1:
        raise CheckpointError(f'{path}: calibration frames must be uint8 [n >= 1, 224, 224, 3], '
                              f'got {dtype} {list(shape)}')


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > _MAX_MANIFEST_BYTES:
            raise CheckpointError(f'{path} is {size} bytes, more than a manifest can be '
                                  f'({_MAX_MANIFEST_BYTES})')
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f'{path} does not exist: not a bundle folder (write one with '
                              'malmm-export bundle --out DIR)') from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f'{path} is not readable JSON: {exc}') from None
    if not isinstance(data, dict):
        raise CheckpointError(f'{path} is not a JSON object')
    return data


def _check_file(path: Path, entry: Any, verify: bool, where: str) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get('sha256'), str) or \
            not isinstance(entry.get('bytes'), int):
        raise CheckpointError(f'{where}: manifest entry of {path.name} needs sha256 and bytes')
    if not path.is_file():
        raise CheckpointError(f'{where}: {path.name} is missing')
    size = path.stat().st_size
    if size != entry['bytes']:
        raise CheckpointError(f'{where}: {path.name} is {size} bytes, the manifest says '
                              f'{entry["bytes"]} (a partial copy?)')
    if verify and file_digest(path) != entry['sha256']:
        raise CheckpointError(f'{where}: {path.name} does not match its sha256 in the '
                              'manifest (changed or corrupt)')
