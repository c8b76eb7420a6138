"""Write a deployable bundle (runtime/bundle.py describes it): the dev-machine side, with torch.

The bundle is written into a temporary folder beside `out` and renamed into place when every
file is there and hashed, so a failed export never leaves a half bundle that a robot could
take for a whole one.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np

from malmm_ros.config import AnticipateConfig
from malmm_ros.errors import ConfigError
from malmm_ros.protocol import Protocol
from malmm_ros.runtime.bundle import (
    BUNDLE_FORMAT,
    CALIBRATION_FILE,
    ENCODER_FILES,
    MANIFEST,
    Bundle,
    file_digest,
    write_calibration,
)

__all__ = ['write_bundle']

_log = logging.getLogger(__name__)


def _versions() -> dict[str, str]:
    out = {'python': platform.python_version()}
    for name in ('malmm_ros', 'torch', 'onnx', 'onnxruntime', 'numpy'):
        try:
            out[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            out[name] = 'unknown'
    return out


def write_bundle(out: str | os.PathLike, config: AnticipateConfig, *,
                 checkpoint: str | os.PathLike | None = None,
                 calibration: Iterable[np.ndarray] | None = None,
                 calibration_source: str = 'sample photos', force: bool = False) -> Bundle:
    """Export `checkpoint` (else the config's untrained model) with its encoders into `out`.

    `calibration`: uint8 [224, 224, 3] frames for the INT8 encoder (default: the package's
    sample photos). An existing `out` is replaced only with `force`.
    """
    import torch

    from malmm_ros.model.checkpoint import (
        load_checkpoint,
        read_checkpoint_metadata,
        save_untrained_checkpoint,
    )
    from malmm_ros.runtime.onnx_export import export_onnx
    from malmm_ros.runtime.quantize import default_calibration_frames, quantize_encoder
    from malmm_ros.runtime.step_export import export_step

    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f'--out {out} exists; pass --force to replace it')
    if out.exists() and not out.is_dir():
        raise ConfigError(f'--out {out} is a file, not a bundle folder')
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f'.{out.name}.', dir=out.parent))
    try:
        if checkpoint:  # copied as it is: a text projector in it stays usable
            model = load_checkpoint(checkpoint, config.model)
            stored = read_checkpoint_metadata(checkpoint)
            shutil.copyfile(checkpoint, work / 'checkpoint.safetensors')
        else:
            save_untrained_checkpoint(work / 'checkpoint.safetensors', config)
            model = load_checkpoint(work / 'checkpoint.safetensors', config.model)
            stored = read_checkpoint_metadata(work / 'checkpoint.safetensors')
        with torch.inference_mode(False):
            spec = export_step(model, work / 'projection.onnx', work / 'step.onnx',
                               capacity=config.memory_bank_length)
        export_onnx(work / ENCODER_FILES['fp32'])
        frames = list(calibration if calibration is not None else default_calibration_frames())
        quantize_encoder(work / ENCODER_FILES['fp32'], work / ENCODER_FILES['int8'], frames)
        # The same frames go along: TensorRT calibrates its INT8 encoder on the robot from them.
        write_calibration(work / CALIBRATION_FILE, np.stack(frames))
        trained = not (isinstance(stored.get('training'), dict)
                       and stored['training'].get('untrained') is True)
        protocol = Protocol.stored(stored)
        manifest: dict[str, Any] = {
            'format': BUNDLE_FORMAT,
            'created': datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec='seconds'),
            'exporter': _versions(),
            'source': str(Path(checkpoint).resolve()) if checkpoint else 'untrained',
            'trained': trained,
            # The node config it was exported with (M, rate, backend ...), for the record; the
            # robot's own config decides how it runs, its model section must match 'model'.
            'config': config.to_dict(),
            'model': stored['model'],
            'protocol': {key: value for key, value in protocol.items()
                         if isinstance(value, int | float | str | bool)},
            'labels': stored['labels'],
            'step': spec.to_json(),
            'calibration': {'source': calibration_source, 'frames': len(frames)},
            'files': {},
        }
        for name in sorted(p.name for p in work.iterdir()):
            (work / name).chmod(0o644)  # temp files are 0600; a bundle is for other users too
            manifest['files'][name] = {'sha256': file_digest(work / name),
                                       'bytes': (work / name).stat().st_size}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1) + '\n')
        Bundle.open(work)  # what a robot will check, before anything is replaced
        os.chmod(work, 0o755)  # mkdtemp's 0700 would keep other users off a shared robot
        if out.exists():
            shutil.rmtree(out)
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _log.info('wrote bundle %s (%s, %d calibration frames)', out,
              'trained' if trained else 'UNTRAINED', len(frames))
    return Bundle.open(out, verify=False)
