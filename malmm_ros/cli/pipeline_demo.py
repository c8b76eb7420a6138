"""malmm-pipeline-demo: the anticipation pipeline (no ROS) on a stream of real photos.

Prints each prediction as a top-5 table. Uses config/anticipate.yaml (or --config); with
--labels-dir pointing at EK-100 annotations the untrained heads at least speak EK-100 names.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from malmm_ros.config import load_config
from malmm_ros.data.sample_stream import panning_frames
from malmm_ros.errors import MalmmError
from malmm_ros.labels import NOUN_CLASSES_FILE, VERB_CLASSES_FILE
from malmm_ros.pipeline import AnticipationPipeline, Prediction
from malmm_ros.stamps import NS_PER_S

_DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / 'config' / 'anticipate.yaml'


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='malmm-pipeline-demo',
                                     description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=str(_DEFAULT_CONFIG),
                        help='parameter file (default: %(default)s)')
    parser.add_argument('--checkpoint', default=None, help='trained checkpoint (.safetensors)')
    parser.add_argument('--labels-dir', default=None,
                        help='folder with EPIC_100_verb_classes.csv and EPIC_100_noun_classes.csv')
    parser.add_argument('--seconds', type=float, default=16.0, help='stream length')
    parser.add_argument('--fps', type=float, default=10.0, help='camera frame rate')
    return parser.parse_args(argv)


def _table(prediction: Prediction) -> str:
    d = prediction.to_dict()
    stamp = prediction.stamp_ns / NS_PER_S
    lines = [f't={stamp:6.2f}s  frames={d["frames_seen"]:4d}  slots={d["memory_slots"]:3d}  '
             f'latency={d["latency_ms"]["total"]:6.1f} ms (encoder '
             f'{d["latency_ms"]["encoder"]:.1f}, memory {d["latency_ms"]["memory"]:.1f})',
             f'  {"verb":<22}{"noun":<26}{"action":<34}']
    for verb, noun, action in zip(d['verb'], d['noun'], d['action'], strict=True):
        lines.append(f'  {verb["name"][:15]:<15}{verb["score"]:6.3f} '
                     f'{noun["name"][:19]:<19}{noun["score"]:6.3f} '
                     f'{action["name"][:27]:<27}{action["score"]:6.4f}')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
    try:
        config = load_config(args.config)
        if args.checkpoint:
            config = config.replace(checkpoint=args.checkpoint)
        if args.labels_dir:
            labels_dir = Path(args.labels_dir)
            if not labels_dir.is_dir():
                logging.warning('labels dir %s not found: using placeholder names', labels_dir)
            else:
                config = config.replace(labels=dataclasses.replace(
                    config.labels, verb_classes=str(labels_dir / VERB_CLASSES_FILE),
                    noun_classes=str(labels_dir / NOUN_CLASSES_FILE)))
        pipeline = AnticipationPipeline(config)
        print(f'malmm-pipeline-demo: {pipeline.model_name}, encoder {pipeline.encoder.name}, '
              f'M={config.memory_bank_length}, sampling {config.sample_fps} fps of a '
              f'{args.fps} fps stream, trained={pipeline.trained}')
        for image, stamp_ns in panning_frames(args.seconds, args.fps):
            prediction = pipeline.push(image, stamp_ns, frame_id='demo_camera')
            if prediction is not None:
                print(_table(prediction), flush=True)
        print(f'done: {pipeline.stats}')
    except MalmmError as exc:
        print(f'ERROR: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
