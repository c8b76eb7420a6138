"""malmm-extract: encoder features of EK-100 videos, one safetensors file per video.

    malmm-extract --frames-root DIR --out DIR [--sample-fps 4]
    malmm-extract --videos DIR --out DIR [--sample-fps 4] [--backend onnxruntime]

Frames go through the node's preprocessing and encoder backend (config/anticipate.yaml's
`backend`, or --backend). Resumable: videos whose features exist (same sample fps, same encoder)
are skipped; --overwrite redoes them. Writes extract_summary.json beside the features.

EK-100's rgb_frames are numbered on a 60 fps grid whatever the camera's rate: in the
annotations, start_frame = 60 x start time for every video (checked on the validation CSV for
its 29.97, 47.95, 59.94 and 90 fps videos). So frames folders default to 60 fps; --video-info
or --fps are for other datasets whose frames follow the camera's rate.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from malmm_ros.config import load_config
from malmm_ros.data.epic import load_video_info
from malmm_ros.data.extraction import (
    SUMMARY_FILE,
    ExtractResult,
    VideoSource,
    extract_all,
    find_frame_folders,
    find_video_files,
    write_summary,
)
from malmm_ros.errors import ConfigError, DataError, MalmmError
from malmm_ros.runtime import BACKENDS, create_encoder

__all__ = ['find_sources', 'main']

_LAYOUTS = ('<root>/<video_id>/frame_0000000001.jpg or '
            '<root>/<participant_id>/rgb_frames/<video_id>/frame_0000000001.jpg')


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='malmm-extract', description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--frames-root', metavar='DIR', help=f'EK-100 frames: {_LAYOUTS}')
    source.add_argument('--videos', metavar='DIR', help='folder of <video_id>.MP4 files')
    parser.add_argument('--out', metavar='DIR', required=True,
                        help='output folder: <video_id>.safetensors and ' + SUMMARY_FILE)
    parser.add_argument('--sample-fps', type=float, default=4.0,
                        help='frames per second to encode (default 4; 0: every frame)')
    parser.add_argument('--video-info', metavar='CSV', default=None,
                        help='CSV (video_id,...,fps) of frame rates per frames folder, for '
                             'datasets whose frames follow the camera rate (not EK-100)')
    parser.add_argument('--fps', type=float, default=None,
                        help='frame rate of frames folders not in --video-info (default '
                             f'{EK100_FRAMES_FPS:g}, the EK-100 rgb_frames grid), or of '
                             'video files whose container has none')
    parser.add_argument('--video-id', nargs='+', metavar='ID', default=None,
                        help='only these videos (default: all found)')
    parser.add_argument('--config', default=None,
                        help='config/anticipate.yaml (backend, device, threads, engine_dir)')
    parser.add_argument('--backend', choices=BACKENDS, default=None,
                        help='encoder backend (default: the config\'s)')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default=None,
                        help='encoder device (default: the config\'s)')
    parser.add_argument('--threads', type=int, default=None,
                        help='encoder threads (default: the config\'s num_threads)')
    parser.add_argument('--batch-size', type=int, default=8, help='frames per encoder call')
    parser.add_argument('--overwrite', action='store_true',
                        help='redo videos whose features exist already')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    return parser.parse_args(argv)


def _check_numbers(args: argparse.Namespace) -> None:
    if not math.isfinite(args.sample_fps) or args.sample_fps < 0:
        raise ConfigError(f'--sample-fps must be >= 0 (0: every frame), got {args.sample_fps}')
    if args.fps is not None and (not math.isfinite(args.fps) or args.fps <= 0):
        raise ConfigError(f'--fps must be a positive number, got {args.fps}')
    if args.batch_size < 1:
        raise ConfigError(f'--batch-size must be >= 1, got {args.batch_size}')
    if args.threads is not None and args.threads < 0:
        raise ConfigError(f'--threads must be >= 0, got {args.threads}')


EK100_FRAMES_FPS = 60.0  # numbering of EK-100 rgb_frames (see the module docstring)


def find_sources(*, frames_root: str | None = None, videos: str | None = None,
                 video_ids: list[str] | None = None, video_info: str | None = None,
                 fps: float | None = None) -> list[VideoSource]:
    """The videos to extract, with their fps; DataError for anything the user must fix."""
    if frames_root is not None:
        found, kind, where = find_frame_folders(frames_root), 'frames', frames_root
        if not found:
            raise DataError(f'no videos found under --frames-root {frames_root} (expected '
                            f'{_LAYOUTS})')
    else:
        assert videos is not None
        found, kind, where = find_video_files(videos), 'video', videos
        if not found:
            raise DataError(f'no videos found in --videos {videos} (expected <video_id>.MP4 '
                            'files)')
    if video_ids:
        unknown = [v for v in dict.fromkeys(video_ids) if v not in found]
        if unknown:
            listed = ', '.join(sorted(found)[:10]) + (' ...' if len(found) > 10 else '')
            raise DataError(f'--video-id {" ".join(unknown)} not found under {where} (found '
                            f'{len(found)}: {listed})')
        found = {v: found[v] for v in dict.fromkeys(video_ids)}
    if kind == 'video':
        return [VideoSource(v, 'video', p, fps) for v, p in found.items()]
    known = {v: info.fps for v, info in load_video_info(video_info).items()} if video_info \
        else {}
    rates = {v: known.get(v, fps if fps is not None else EK100_FRAMES_FPS) for v in found}
    return [VideoSource(v, 'frames', p, rates[v]) for v, p in found.items()]


def _table(results: list[ExtractResult]) -> Table:
    table = Table(title='malmm-extract')
    for name in ('video', 'status', 'sampled', 'encoded', 'missing', 'corrupt', 'seconds'):
        table.add_column(name, justify='left' if name in ('video', 'status') else 'right')
    styles = {'extracted': 'green', 'existing': 'cyan', 'failed': 'red'}
    for r in results:
        table.add_row(r.video_id, f'[{styles[r.status]}]{r.status}[/]', str(r.frames_sampled),
                      str(r.frames_encoded), str(r.frames_missing), str(r.frames_corrupt),
                      f'{r.seconds:.1f}')
    return table


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
    try:
        _check_numbers(args)
        sources = find_sources(frames_root=args.frames_root, videos=args.videos,
                               video_ids=args.video_id, video_info=args.video_info,
                               fps=args.fps)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise DataError(f'--out {out} exists and is not a folder')
        config = load_config(args.config)
        changes = {k: v for k, v in (('backend', args.backend), ('device', args.device),
                                     ('num_threads', args.threads)) if v is not None}
        config = config.replace(**changes) if changes else config
        encoder = create_encoder(config.backend, device=config.device,
                                 threads=config.threads(), precision=config.precision,
                                 engine_dir=config.engine_dir or None)
        out.mkdir(parents=True, exist_ok=True)
        results = extract_all(sources, out, encoder, sample_fps=args.sample_fps,
                              batch_size=args.batch_size, overwrite=args.overwrite,
                              progress=not args.quiet)
        summary = write_summary(out, results, {
            'source': sources[0].kind, 'source_dir': str(args.frames_root or args.videos),
            'sample_fps': args.sample_fps, 'backend': encoder.name})
    except MalmmError as exc:
        print(f'ERROR: {exc}', file=sys.stderr)
        return 1
    Console().print(_table(results))
    failed = [r for r in results if r.status == 'failed']
    encoded = sum(r.frames_encoded for r in results if r.status == 'extracted')
    print(f'{len(results) - len(failed)} of {len(results)} videos ready in {out} '
          f'({encoded} frames encoded now); summary: {summary}')
    if failed:
        for r in failed:
            print(f'ERROR: {r.video_id}: {r.message}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
