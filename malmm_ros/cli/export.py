"""malmm-export: write a deployable bundle, export the encoder to ONNX, compile a TensorRT
engine, or write an untrained checkpoint.

    malmm-export bundle --out DIR [--checkpoint CK] [--calib BAG_OR_DIR] [--calib-frames N]
                        [--config YAML] [--force]
    malmm-export onnx [--out engines/efficientnet_lite0.onnx] [--opset 17]
    malmm-export engine [--precision fp16|int8|fp32] [--calib BAG_OR_DIR] [--onnx PATH]
                        [--engine-dir DIR]
    malmm-export checkpoint --untrained --out OUT.safetensors [--config YAML]
                            [--labels-dir DIR] [--force]

A bundle (malmm_ros/runtime/bundle.py) is what a robot runs with `runtime: onnx` and no torch:
the encoder in fp32 and INT8 (calibrated on real frames: a bag, an image folder or, by default,
the package's sample photos), the step graphs, the checkpoint and a manifest with every file's
sha256. Without --checkpoint it holds the config's untrained model, marked so.

The untrained checkpoint holds the seeded random model the node runs without a checkpoint, in
the config's architecture: enough to smoke-test malmm-eval and the node before any training.
It is marked untrained, and every tool that reports on it says so. Trained checkpoints come
from malmm-train.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from malmm_ros.errors import CheckpointError, ConfigError, MalmmError
from malmm_ros.imaging import resize_and_crop
from malmm_ros.runtime.onnx_export import ONNX_FILENAME, default_engine_dir, export_onnx

__all__ = ['calibration_frames', 'main']

_DEFAULT_CONFIG = Path('config/anticipate.yaml')


def calibration_frames(source: str | Path, limit: int) -> Iterator[np.ndarray]:
    """Up to `limit` resized uint8 RGB frames [224, 224, 3] from a rosbag2 or an image folder."""
    source = Path(source)
    if (source / 'metadata.yaml').is_file() or source.suffix in ('.db3', '.mcap'):
        from malmm_ros.data.bags import read_camera_frames

        frames = (resize_and_crop(f.image) for f in read_camera_frames(source))
    elif source.is_dir():
        from malmm_ros.cli.make_bag import load_photos

        frames = (resize_and_crop(photo) for photo in load_photos(source))
    else:
        raise ConfigError(f'--calib {source}: neither a rosbag2 nor a folder of images')
    return itertools.islice(frames, limit)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='malmm-export', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='what', required=True)
    bundle = sub.add_parser('bundle', help='write a deployable bundle folder (encoders, step '
                            'graphs, checkpoint, manifest)')
    bundle.add_argument('--out', required=True, metavar='DIR')
    bundle.add_argument('--checkpoint', default=None, metavar='CK.safetensors',
                        help='trained checkpoint (default: the config\'s untrained model)')
    bundle.add_argument('--calib', default=None, metavar='BAG_OR_DIR',
                        help='INT8 calibration frames: a rosbag2 or an image folder (default: '
                             'the package\'s sample photos)')
    bundle.add_argument('--calib-frames', type=int, default=200,
                        help='at most this many calibration frames (default 200)')
    bundle.add_argument('--config', default=None, metavar='YAML',
                        help='node config whose model section, memory length and labels to use '
                             '(default config/anticipate.yaml when it exists)')
    bundle.add_argument('--force', action='store_true', help='replace an existing DIR')
    onnx = sub.add_parser('onnx', help='export the encoder (with preprocessing) to ONNX')
    onnx.add_argument('--out', default=None, help=f'default: <engine dir>/{ONNX_FILENAME}')
    onnx.add_argument('--opset', type=int, default=17)
    engine = sub.add_parser('engine', help='build a TensorRT engine into the engine cache')
    engine.add_argument('--precision', choices=('fp16', 'int8', 'fp32'), default='fp16')
    engine.add_argument('--calib', default=None, help='bag or image folder (int8 calibration)')
    engine.add_argument('--calib-frames', type=int, default=200)
    engine.add_argument('--onnx', default=None, help='ONNX file (default: export if missing)')
    engine.add_argument('--engine-dir', default=None, help='cache folder')
    checkpoint = sub.add_parser('checkpoint', help='write an untrained checkpoint (for smoke '
                                'tests; trained ones come from malmm-train)')
    checkpoint.add_argument('--untrained', action='store_true',
                            help='required: say that the checkpoint is to be untrained')
    checkpoint.add_argument('--out', required=True, metavar='OUT.safetensors')
    checkpoint.add_argument('--config', default=None, metavar='YAML',
                            help='node config whose model architecture, memory length and '
                                 'sampling rate to use (default config/anticipate.yaml when it '
                                 'exists, else the built-in defaults)')
    checkpoint.add_argument('--labels-dir', default=None, metavar='DIR',
                            help='EK-100 annotations folder with EPIC_100_verb_classes.csv and '
                                 'EPIC_100_noun_classes.csv (default: the config\'s labels, '
                                 'else placeholder names)')
    checkpoint.add_argument('--force', action='store_true',
                            help='replace OUT even if it holds a trained checkpoint')
    return parser.parse_args(argv)


def _untrained_checkpoint(args: argparse.Namespace) -> Path:
    from malmm_ros.config import load_config
    from malmm_ros.labels import NOUN_CLASSES_FILE, VERB_CLASSES_FILE
    from malmm_ros.model.checkpoint import checkpoint_is_trained, save_untrained_checkpoint

    if not args.untrained:
        raise ConfigError('malmm-export checkpoint writes untrained checkpoints only, for smoke '
                          'tests: pass --untrained; trained checkpoints come from malmm-train')
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f'--out {out} is a folder; name the .safetensors file to write')
    if out.exists() and not args.force:
        try:
            trained = checkpoint_is_trained(out)
        except CheckpointError:
            trained = False  # not a checkpoint: nothing trained to lose
        if trained:
            raise ConfigError(f'--out {out.resolve()} holds a trained checkpoint; pass --force '
                              'to replace it with an untrained one, or choose another path')
    source = args.config if args.config is not None else (
        _DEFAULT_CONFIG if _DEFAULT_CONFIG.is_file() else None)
    config = load_config(source)
    if args.labels_dir is not None:
        labels_dir = Path(args.labels_dir)
        if not labels_dir.is_dir():
            raise ConfigError(f'--labels-dir {labels_dir} is not a folder')
        config = config.replace(labels=dataclasses.replace(
            config.labels, verb_classes=str(labels_dir / VERB_CLASSES_FILE),
            noun_classes=str(labels_dir / NOUN_CLASSES_FILE)))
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_untrained_checkpoint(out, config)


def _bundle(args: argparse.Namespace) -> str:
    from malmm_ros.config import load_config
    from malmm_ros.runtime.bundle_export import write_bundle

    if not 1 <= args.calib_frames <= 100_000:
        raise ConfigError(f'--calib-frames must be 1 to 100000, got {args.calib_frames}')
    source = args.config if args.config is not None else (
        _DEFAULT_CONFIG if _DEFAULT_CONFIG.is_file() else None)
    config = load_config(source)
    frames = None
    if args.calib:
        frames = list(calibration_frames(args.calib, args.calib_frames))
        if not frames:
            raise ConfigError(f'--calib {args.calib} holds no usable frames')
    bundle = write_bundle(args.out, config, checkpoint=args.checkpoint, calibration=frames,
                          calibration_source=args.calib or 'sample photos', force=args.force)
    state = 'trained' if bundle.trained else 'UNTRAINED (chance-level predictions)'
    return (f'wrote bundle {bundle.path}: {state}, {bundle.manifest["calibration"]["frames"]} '
            'calibration frames; run it with runtime: onnx, bundle: '
            f'{bundle.path.resolve()}')


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s: %(message)s')
    try:
        if args.what == 'bundle':
            print(_bundle(args))
            return 0
        if args.what == 'checkpoint':
            path = _untrained_checkpoint(args)
            print(f'wrote {path}: UNTRAINED (seeded random weights, chance-level predictions; '
                  'for smoke tests only)')
            return 0
        if args.what == 'onnx':
            out = Path(args.out) if args.out else default_engine_dir() / ONNX_FILENAME
            print(f'wrote {export_onnx(out, opset=args.opset)}')
            return 0
        from malmm_ros.runtime.onnx_export import ensure_onnx
        from malmm_ros.runtime.tensorrt_encoder import TensorRTEncoder, tensorrt_available

        available, why = tensorrt_available()
        if not available:
            raise ConfigError(f'building an engine needs TensorRT and a CUDA GPU '
                              f'(pip install .[tensorrt]): {why}')
        if args.precision == 'int8' and not args.calib:
            raise ConfigError('int8 needs calibration frames: --calib BAG_OR_DIR')
        frames = (calibration_frames(args.calib, args.calib_frames) if args.calib else None)
        encoder = TensorRTEncoder(ensure_onnx(args.onnx, args.engine_dir),
                                  cache_dir=Path(args.engine_dir or default_engine_dir()),
                                  precision=args.precision, calibration_frames=frames)
        print(f'engine ready: {encoder.name}')
        return 0
    except (MalmmError, OSError) as exc:
        print(f'ERROR: {exc}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
