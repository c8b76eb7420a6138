"""malmm-eval: EK-100 action anticipation metrics of a checkpoint, from a bag or from features.

    malmm-eval --bag BAG --annotations EPIC_100_validation.csv --video-id P01_11 --checkpoint CK
    malmm-eval --bag BAG ... --live         # also replay the bag into the running node
    malmm-eval --features DIR --annotations EPIC_100_validation.csv --checkpoint CK

Direct mode reads every frame of the bag and runs the pipeline deterministically; features
mode scores the whole split from malmm-extract features; live mode starts the node, replays
the bag into it over ROS 2 with its original timing and scores what came out on
/malmm/actions. Live mode always runs direct mode first: it is the reference whose gap shows
what drops and latency cost. Each segment is scored with the newest prediction at or before
ts - ta; segments with none are misses.

Writes <out>/metrics.json, <out>/submission.json (challenge format) and <out>/report/
(summary.md, plots); live mode puts direct mode's files in <out>/direct/.

Without a trained checkpoint, `malmm-export checkpoint --untrained --out CK` makes one to
smoke-test with; metrics.json then says "trained": false and summary.md opens with UNTRAINED.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from malmm_ros.config import AnticipateConfig
from malmm_ros.errors import ConfigError, MalmmError

__all__ = ['main']

_log = logging.getLogger('malmm_ros.eval')
_DEFAULT_CONFIG = Path('config/anticipate.yaml')


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='malmm-eval', description=__doc__.splitlines()[0],
        epilog='Exit status: 0 on success, 1 on an error (printed as one ERROR: line), 2 for '
               'bad arguments.')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--bag', metavar='BAG', help='rosbag2 of one video (direct/live mode)')
    source.add_argument('--features', metavar='DIR',
                        help='malmm-extract output folder (features mode: the whole split)')
    parser.add_argument('--annotations', metavar='CSV', required=True,
                        help='EK-100 segment CSV, e.g. EPIC_100_validation.csv')
    parser.add_argument('--checkpoint', metavar='CK',
                        help='safetensors checkpoint (default: malmm-train\'s output, '
                             'runs/train/checkpoint.safetensors); without a trained one, '
                             'smoke-test with: malmm-export checkpoint --untrained --out CK')
    parser.add_argument('--video-id', nargs='+', metavar='ID',
                        help='the bag\'s video (direct/live: one, required); features mode: '
                             'only these videos')
    parser.add_argument('--annotations-dir', metavar='DIR',
                        help='folder with EPIC_100_tail_{verbs,nouns}.csv and '
                             'EPIC_100_unseen_participant_ids_validation.csv (default: the '
                             'CSV\'s folder); subsets whose files are absent are left out')
    parser.add_argument('--config', metavar='YAML',
                        help='node config for direct/live mode (default config/anticipate.yaml '
                             'when it exists, else the built-in defaults)')
    parser.add_argument('--topic', help='image topic of a bag with several')
    parser.add_argument('--video-start-ns', type=int, metavar='N',
                        help='stamp of the video\'s first frame (default: the bag\'s first '
                             'frame): video time = stamp - N')
    parser.add_argument('--tau-a', type=float, metavar='S',
                        help='anticipation time (default: the checkpoint\'s, else 1.0)')
    parser.add_argument('--tau-o', type=float, metavar='S',
                        help='observed window, features mode (default: the checkpoint\'s)')
    parser.add_argument('--sample-fps', type=float, metavar='F',
                        help='sampling rate (default: the checkpoint\'s; direct/live check '
                             'that the config agrees unless this is given)')
    parser.add_argument('--memory-length', type=int, metavar='M',
                        help='memory slots M (default: the checkpoint\'s, checked likewise)')
    parser.add_argument('--out', metavar='DIR', default='runs/eval',
                        help='output folder (default runs/eval)')
    parser.add_argument('--live', action='store_true',
                        help='also replay the bag into the node over ROS 2 and score its output')
    parser.add_argument('--rate', type=float, default=1.0,
                        help='live replay speed factor (default 1.0: original timing)')
    parser.add_argument('--domain-id', type=int, metavar='N',
                        help='ROS_DOMAIN_ID of the live run (default: the environment\'s); '
                             'discovery stays on this machine')
    parser.add_argument('--node-timeout', type=float, default=120.0, metavar='S',
                        help='live: seconds to wait for the node to start (default 120)')
    parser.add_argument('--batch-size', type=int, default=32,
                        help='features mode: windows per forward (default 32)')
    parser.add_argument('--threads', type=int, metavar='N',
                        help='torch threads (default: the config\'s num_threads)')
    for level, meaning in (('pt', 'pre-training'), ('tl', 'training labels'),
                           ('td', 'training data')):
        parser.add_argument(f'--sls-{level}', type=int, default=0, metavar='L',
                            help=f'submission: Supervision Levels Scale, {meaning} (0..5; '
                                 'declare your method\'s, default 0)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    args = parser.parse_args(argv)
    if args.bag is not None and (not args.video_id or len(args.video_id) != 1):
        parser.error('--bag needs exactly one --video-id (the video the bag holds)')
    if args.live and args.bag is None:
        parser.error('--live needs --bag')
    if args.features is not None and args.video_start_ns is not None:
        parser.error('--video-start-ns applies to --bag only')
    return args


def _check_args(args: argparse.Namespace) -> None:
    checks = (
        ('--rate', args.rate, args.rate > 0),
        ('--batch-size', args.batch_size, args.batch_size >= 1),
        ('--node-timeout', args.node_timeout, args.node_timeout > 0),
        ('--threads', args.threads, args.threads is None or args.threads >= 1),
        ('--domain-id', args.domain_id, args.domain_id is None or 0 <= args.domain_id <= 232),
        ('--memory-length', args.memory_length,
         args.memory_length is None or args.memory_length >= 1),
        ('--sample-fps', args.sample_fps, args.sample_fps is None or args.sample_fps > 0),
        ('--tau-a', args.tau_a, args.tau_a is None or args.tau_a >= 0),
        ('--tau-o', args.tau_o, args.tau_o is None or args.tau_o > 0),
    )
    for flag, value, ok in checks:
        if not ok:
            raise ConfigError(f'{flag} {value!r} is out of range')
    for level in ('sls_pt', 'sls_tl', 'sls_td'):
        if not 0 <= getattr(args, level) <= 5:
            raise ConfigError(f'--{level.replace("_", "-")} must be in 0..5')
    if not Path(args.annotations).is_file():
        raise ConfigError(f'--annotations {args.annotations} does not exist or is not a file')


def _checkpoint_path(given: str | None) -> Path:
    """The checkpoint to score: --checkpoint, else malmm-train's default output; a missing one
    is a ConfigError that names it and says how to make an untrained one to smoke-test with."""
    if given is not None:
        path, origin = Path(given), '--checkpoint'
    else:
        from malmm_ros.training.config import TrainConfig
        from malmm_ros.training.loop import CHECKPOINT_NAME

        path = Path(TrainConfig().out_dir) / CHECKPOINT_NAME
        origin = 'no --checkpoint given; malmm-train\'s default output'
    if path.is_file():
        return path
    tried = path.resolve()
    what = 'is a folder, not a checkpoint file' if path.is_dir() else 'does not exist'
    raise ConfigError(f'checkpoint {tried} ({origin}) {what}. No trained checkpoint? Make an '
                      f'untrained one to smoke-test with: malmm-export checkpoint --untrained '
                      f'--out {tried}')


def _write(out: Path, evaluation: Any, args: argparse.Namespace,
           record: dict[str, Any] | None = None) -> dict[str, Path]:
    from malmm_ros.evaluation import write_metrics, write_report, write_submission

    out.mkdir(parents=True, exist_ok=True)
    record = record if record is not None else evaluation.to_dict()
    files = {'metrics': write_metrics(out / 'metrics.json', record),
             'submission': write_submission(out / 'submission.json', evaluation.scores,
                                            sls_pt=args.sls_pt, sls_tl=args.sls_tl,
                                            sls_td=args.sls_td)}
    written = write_report(out / 'report', evaluation, record=record)
    files['report'] = written[0]
    return files


def _percent(value: float | None, signed: bool = False) -> str:
    if value is None:
        return '-'
    return f'{100 * value:+.1f}' if signed else f'{100 * value:.1f}'


def _table(evaluation: Any, reference: Any | None) -> Table:
    title = f'malmm-eval {evaluation.mode}: metrics (%)'
    table = Table(title=title)
    for column in ('subset', 'task', 'top-1', 'top-5', 'mean top-5 recall', 'segments'):
        table.add_column(column, justify='left' if column in ('subset', 'task') else 'right')
    if reference is not None:
        table.add_column(f'{reference.mode} mt5r', justify='right')
        table.add_column('gap', justify='right')
    metrics = evaluation.metrics or {}
    for subset, tasks in metrics.items():
        for task, m in tasks.items():
            row = [subset, task, _percent(m['top1_accuracy']), _percent(m['top5_accuracy']),
                   _percent(m['mean_top5_recall']), str(m['count'])]
            if reference is not None:
                theirs = (reference.metrics or {}).get(subset, {}).get(task, {})
                value = theirs.get('mean_top5_recall')
                gap = (None if value is None or m['mean_top5_recall'] is None
                       else m['mean_top5_recall'] - value)
                row += [_percent(value), _percent(gap, signed=True)]
            table.add_row(*row)
    return table


def _run(args: argparse.Namespace, console: Console) -> int:
    from malmm_ros.evaluation import (
        evaluate_direct,
        evaluate_features,
        load_annotations,
        node_config,
        open_checkpoint,
    )

    _check_args(args)
    checkpoint = open_checkpoint(_checkpoint_path(args.checkpoint), tau_a=args.tau_a,
                                 tau_o=args.tau_o, sample_fps=args.sample_fps,
                                 memory_bank_length=args.memory_length)
    if not checkpoint.trained:
        console.print(f'[bold yellow]UNTRAINED checkpoint[/] {checkpoint.path}: seeded random '
                      'weights, so every number below is chance-level (a smoke test only)')
    if checkpoint.protocol.tau_a != 1.0:
        console.print(f'[yellow]note[/]: tau_a = {checkpoint.protocol.tau_a:g} s; the EK-100 '
                      'protocol anticipates 1 s ahead')
    context = load_annotations(args.annotations, checkpoint.labels,
                               annotations_dir=args.annotations_dir)
    out = Path(args.out)
    progress = not args.no_progress
    if args.features is not None:
        torch.set_num_threads(args.threads or AnticipateConfig().threads())
        evaluation = evaluate_features(args.features, checkpoint, context,
                                       video_ids=args.video_id, batch_size=args.batch_size,
                                       progress=progress)
        files = _write(out, evaluation, args)
        console.print(_table(evaluation, None))
        _print_counts(console, evaluation, files)
        return 0

    source = args.config if args.config is not None else (
        _DEFAULT_CONFIG if _DEFAULT_CONFIG.is_file() else None)
    config = node_config(source, checkpoint, sample_fps=args.sample_fps,
                         memory_bank_length=args.memory_length)
    if args.threads:
        config = config.replace(num_threads=args.threads)
    video_id = args.video_id[0]
    direct, timeline = evaluate_direct(args.bag, video_id, checkpoint, context, config,
                                       topic=args.topic, video_start_ns=args.video_start_ns,
                                       progress=progress)
    if not args.live:
        files = _write(out, direct, args)
        console.print(_table(direct, None))
        _print_counts(console, direct, files)
        return 0

    if importlib.util.find_spec('rclpy') is None:
        raise MalmmError('live mode needs ROS 2 (rclpy); direct and features mode do not')
    from malmm_ros.ros.live_eval import evaluate_live

    direct_files = _write(out / 'direct', direct, args)
    live, record = evaluate_live(args.bag, video_id, checkpoint, context, config, direct,
                                 timeline, out_dir=out, topic=args.topic, rate=args.rate,
                                 domain_id=args.domain_id, node_timeout_s=args.node_timeout,
                                 progress=progress)
    files = _write(out, live, args, record)
    console.print(_table(live, direct))
    _print_counts(console, live, files)
    stream = record.get('stream', {})
    latency = record.get('latency_ms') or {}
    console.print(f'live: {stream.get("published", "?")} frames published, '
                  f'{stream.get("predictions", "?")} predictions received of '
                  f'{stream.get("expected_predictions", "?")} in direct mode, '
                  f'{stream.get("dropped_by_node", "?")} dropped by the node, '
                  f'{stream.get("lost_in_transport", "?")} lost in transport; end-to-end latency '
                  f'p50 {latency.get("p50", "?")} ms, p95 {latency.get("p95", "?")} ms')
    console.print(f'direct mode: {direct_files["metrics"]}')
    return 0


def _print_counts(console: Console, evaluation: Any, files: dict[str, Path]) -> None:
    counts = evaluation.scores.counts()
    console.print(f'{counts["segments"]} segments: {counts["scored"]} scored, '
                  f'{counts["no_observation"]} with ts - ta < 0, {counts["no_prediction"]} '
                  f'without a prediction (misses); {evaluation.runtime_s:.1f} s')
    if evaluation.metrics is None:
        console.print('[yellow]no verb/noun classes in the annotations: no metrics, '
                      'submission only[/]')
    console.print(f'metrics: {files["metrics"]}\nsubmission: {files["submission"]}\n'
                  f'report: {files["report"]}')


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    console = Console(stderr=False)
    began = time.perf_counter()
    try:
        code = _run(args, console)
    except (MalmmError, OSError) as exc:  # OSError: an output folder that cannot be written
        print(f'ERROR: {exc}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('malmm-eval: interrupted', file=sys.stderr)
        return 130
    _log.info('done in %.1f s', time.perf_counter() - began)
    return code


if __name__ == '__main__':
    sys.exit(main())
