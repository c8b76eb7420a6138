"""malmm-export: export the encoder to ONNX, or compile a TensorRT engine into the cache.

    malmm-export onnx [--out engines/efficientnet_lite0.onnx] [--opset 17]
    malmm-export engine [--precision fp16|int8|fp32] [--calib BAG_OR_DIR] [--onnx PATH]
                        [--engine-dir DIR]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from malmm_ros.errors import ConfigError, MalmmError
from malmm_ros.model.encoder import resize_and_crop
from malmm_ros.runtime.onnx_export import ONNX_FILENAME, default_engine_dir, export_onnx

__all__ = ['calibration_frames', 'main']


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
    onnx = sub.add_parser('onnx', help='export the encoder (with preprocessing) to ONNX')
    onnx.add_argument('--out', default=None, help=f'default: <engine dir>/{ONNX_FILENAME}')
    onnx.add_argument('--opset', type=int, default=17)
    engine = sub.add_parser('engine', help='build a TensorRT engine into the engine cache')
    engine.add_argument('--precision', choices=('fp16', 'int8', 'fp32'), default='fp16')
    engine.add_argument('--calib', default=None, help='bag or image folder (int8 calibration)')
    engine.add_argument('--calib-frames', type=int, default=200)
    engine.add_argument('--onnx', default=None, help='ONNX file (default: export if missing)')
    engine.add_argument('--engine-dir', default=None, help='cache folder')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s: %(message)s')
    try:
        if args.what == 'onnx':
            out = Path(args.out) if args.out else default_engine_dir() / ONNX_FILENAME
            print(f'wrote {export_onnx(out, opset=args.opset)}')
            return 0
        from malmm_ros.runtime.onnxruntime_encoder import ensure_onnx
        from malmm_ros.runtime.tensorrt_encoder import TensorRTEncoder, tensorrt_available

        available, why = tensorrt_available()
        if not available:
            raise ConfigError(f'building an engine needs TensorRT and a CUDA GPU '
                              f'(pip install .[tensorrt]): {why}')
        if args.precision == 'int8' and not args.calib:
            raise ConfigError('int8 needs calibration frames: --calib BAG_OR_DIR')
        frames = (calibration_frames(args.calib, args.calib_frames) if args.calib else None)
        encoder = TensorRTEncoder(ensure_onnx(args.onnx),
                                  cache_dir=Path(args.engine_dir or default_engine_dir()),
                                  precision=args.precision, calibration_frames=frames)
        print(f'engine ready: {encoder.name}')
        return 0
    except MalmmError as exc:
        print(f'ERROR: {exc}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
