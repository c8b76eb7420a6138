"""Evaluation outputs: metrics JSON, a markdown summary and PNG plots.

    <out>/metrics.json        everything measured (format malmm_ros/eval/v1)
    <out>/submission.json     the challenge submission (malmm_ros.evaluation.submission)
    <out>/report/summary.md   the metrics tables, counts, settings and the plots below
    <out>/report/*.png        per-class top-5 recall (verbs, nouns, actions), confusion of the
                              most frequent verbs, end-to-end latency histogram (live mode)

Plots use matplotlib's Agg canvas directly (no pyplot state, no display needed).
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from malmm_ros.data.epic import action_label_indices
from malmm_ros.evaluation.scoring import SegmentScores
from malmm_ros.files import atomic_write
from malmm_ros.labels import LabelMaps, action_ids
from malmm_ros.metrics import per_class_topk_recall, topk_indices

__all__ = ['EVAL_FORMAT', 'Evaluation', 'latency_summary', 'metric_gap', 'write_metrics',
           'write_report']

EVAL_FORMAT = 'malmm_ros/eval/v1'
SUBSETS = ('overall', 'unseen', 'tail')
TASKS = ('verb', 'noun', 'action')
_MAX_BARS = 40  # classes per recall plot (the most frequent ones)
_CONFUSION_VERBS = 12


@dataclass
class Evaluation:
    """One evaluation run: its scores per segment, metrics and everything needed to report it.

    `metrics` is None when the segments carry no labels (test timestamps: submission only).
    `latency_ms` holds end-to-end latencies (live mode) for the histogram. `trained` is False
    for an untrained checkpoint (malmm-export checkpoint --untrained): chance-level numbers.
    """

    mode: str
    scores: SegmentScores
    labels: LabelMaps
    metrics: dict[str, Any] | None
    settings: dict[str, Any]
    inputs: dict[str, Any]
    runtime_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    latency_ms: np.ndarray | None = None
    _: KW_ONLY
    checkpoint: str  # the checkpoint scored, as an absolute path
    trained: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            'format': EVAL_FORMAT,
            'mode': self.mode,
            'checkpoint': self.checkpoint,
            'trained': self.trained,
            'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'inputs': self.inputs,
            'settings': self.settings,
            'segments': self.scores.counts(),
            'metrics': self.metrics,
            'runtime_s': round(self.runtime_s, 3),
            **self.extra,
        }


def metric_gap(ours: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """ours - reference for every shared (subset, task, metric) value (None if either is)."""
    gap: dict[str, Any] = {}
    for subset, tasks in ours.items():
        for task, values in tasks.items():
            other = reference.get(subset, {}).get(task, {})
            for name, value in values.items():
                if name in ('count', 'classes'):
                    continue
                theirs = other.get(name)
                gap.setdefault(subset, {}).setdefault(task, {})[name] = (
                    None if value is None or theirs is None else value - theirs)
    return gap


def latency_summary(values_ms: np.ndarray) -> dict[str, float] | None:
    """p50, p95, max and count of the finite values (milliseconds); None without any."""
    values = np.asarray(values_ms, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return None
    return {'p50': round(float(np.percentile(values, 50)), 2),
            'p95': round(float(np.percentile(values, 95)), 2),
            'max': round(float(values.max()), 2), 'count': int(values.size)}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f'{type(value).__name__} is not JSON-serializable')


def write_metrics(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write a metrics record as indented JSON (atomically)."""
    path = Path(path)
    return atomic_write(path, json.dumps(record, indent=2, default=_json_default) + '\n')


# --- plots --------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout='constrained')
    FigureCanvasAgg(figure)
    return figure


def _task_arrays(evaluation: Evaluation, task: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores, labels (score columns, -1 for unscored actions) and class ids of one task."""
    rows, samples = evaluation.scores.rows, evaluation.scores.samples
    verbs = np.array([s.verb_class for s in samples], dtype=np.int64)
    nouns = np.array([s.noun_class for s in samples], dtype=np.int64)
    if task == 'verb':
        return rows.verb, verbs, verbs
    if task == 'noun':
        return rows.noun, nouns, nouns
    actions = action_label_indices(samples, [tuple(p) for p in rows.action_pairs])
    scores = rows.action if rows.action.shape[1] else np.zeros((len(samples), 1), np.float32)
    return scores, actions, action_ids(verbs, nouns)


def _class_name(labels: LabelMaps, task: str, class_id: int) -> str:
    try:
        if task == 'verb':
            return labels.verb_name(class_id)
        if task == 'noun':
            return labels.noun_name(class_id)
        verb, noun = divmod(class_id, 1000)
        return f'{labels.verb_name(verb)} {labels.noun_name(noun)}'
    except Exception:  # an id beyond the label maps: show the number
        return str(class_id)


def _recall_plot(evaluation: Evaluation, task: str, path: Path, k: int = 5) -> Path:
    scores, labels, class_ids = _task_arrays(evaluation, task)
    recall = per_class_topk_recall(scores, labels, k, class_ids=class_ids,
                                   observed=evaluation.scores.observed)
    counts = dict(zip(*np.unique(class_ids, return_counts=True), strict=True))
    shown = sorted(recall, key=lambda c: (-counts[c], c))[:_MAX_BARS]
    names = [f'{_class_name(evaluation.labels, task, c)} ({counts[c]})' for c in shown]
    values = [100.0 * recall[c] for c in shown]
    figure = _figure(8.0, 1.2 + 0.28 * len(shown))
    axes = figure.add_subplot()
    positions = np.arange(len(shown))
    axes.barh(positions, values, color='tab:blue')
    axes.set_yticks(positions, names, fontsize=8)
    axes.invert_yaxis()  # most frequent on top
    axes.set_xlim(0, 100)
    axes.set_xlabel(f'top-{k} recall (%)')
    mean = 100.0 * float(np.mean(list(recall.values())))
    axes.axvline(mean, color='tab:red', linestyle='--', label=f'class mean {mean:.1f}%')
    axes.legend(loc='lower right', fontsize=8)
    more = f', {len(shown)} most frequent of {len(recall)}' if len(recall) > len(shown) else ''
    axes.set_title(f'{evaluation.mode}: per-class top-{k} recall, {task}s (segments per class '
                   f'in brackets{more})', fontsize=9)
    figure.savefig(path)
    return path


def _confusion_plot(evaluation: Evaluation, path: Path) -> Path:
    """Rows: the most frequent true verbs; columns: the top-1 predicted verb among them,
    'other' (any other verb) or 'none' (no prediction); each row sums to 100 %."""
    scores = evaluation.scores
    truth = np.array([s.verb_class for s in scores.samples], dtype=np.int64)
    predicted = topk_indices(scores.rows.verb, 1)[:, 0]
    classes, counts = np.unique(truth, return_counts=True)
    top = classes[np.lexsort((classes, -counts))][:_CONFUSION_VERBS]
    column = {int(c): j for j, c in enumerate(top)}
    matrix = np.zeros((len(top), len(top) + 2))
    for t, p, seen in zip(truth, predicted, scores.observed, strict=True):
        if int(t) not in column:
            continue
        j = column.get(int(p), len(top)) if seen else len(top) + 1
        matrix[column[int(t)], j] += 1
    matrix = 100.0 * matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    names = [_class_name(evaluation.labels, 'verb', int(c)) for c in top]
    size = 2.5 + 0.45 * (len(top) + 2)
    figure = _figure(size + 1.0, size)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap='Blues', vmin=0, vmax=100)
    axes.set_xticks(np.arange(len(top) + 2), [*names, 'other', 'none'], rotation=60,
                    ha='right', fontsize=8)
    axes.set_yticks(np.arange(len(top)), names, fontsize=8)
    axes.set_xlabel('predicted verb (top-1)')
    axes.set_ylabel('true verb')
    for (i, j), value in np.ndenumerate(matrix):
        if value >= 0.5:
            axes.text(j, i, f'{value:.0f}', ha='center', va='center', fontsize=7,
                      color='white' if value > 50 else 'black')
    figure.colorbar(image, ax=axes, label='% of the true verb\'s segments')
    axes.set_title(f'{evaluation.mode}: confusion of the {len(top)} most frequent verbs',
                   fontsize=9)
    figure.savefig(path)
    return path


def _latency_plot(latency_ms: np.ndarray, title: str, path: Path) -> Path:
    values = latency_ms[np.isfinite(latency_ms)]
    figure = _figure(7.0, 4.0)
    axes = figure.add_subplot()
    axes.hist(values, bins=min(50, max(5, len(values) // 4)), color='tab:blue')
    for q, style in ((50, '--'), (95, ':')):
        value = float(np.percentile(values, q))
        axes.axvline(value, color='tab:red', linestyle=style, label=f'p{q} {value:.1f} ms')
    axes.set_xlabel('milliseconds')
    axes.set_ylabel('predictions')
    axes.legend(fontsize=8)
    axes.set_title(title, fontsize=9)
    figure.savefig(path)
    return path


# --- summary ------------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return '-' if value is None else f'{100.0 * value:.1f}'


def _metrics_table(metrics: dict[str, Any], k: int = 5) -> list[str]:
    lines = [f'| subset | task | top-1 acc. | top-{k} acc. | mean top-{k} recall | segments '
             '| classes |', '|---|---|---:|---:|---:|---:|---:|']
    ordered = [s for s in SUBSETS if s in metrics] + [s for s in metrics if s not in SUBSETS]
    for subset in ordered:
        for task in TASKS:
            m = metrics[subset][task]
            lines.append(f'| {subset} | {task} | {_percent(m["top1_accuracy"])} | '
                         f'{_percent(m[f"top{k}_accuracy"])} | '
                         f'{_percent(m[f"mean_top{k}_recall"])} | {m["count"]} | '
                         f'{m["classes"]} |')
    return lines


def _gap_table(gap: dict[str, Any], k: int = 5) -> list[str]:
    lines = [f'| subset | task | top-1 acc. | top-{k} acc. | mean top-{k} recall |',
             '|---|---|---:|---:|---:|']

    def points(value: float | None) -> str:
        return '-' if value is None else f'{100.0 * value:+.1f}'

    for subset, tasks in gap.items():
        for task in TASKS:
            m = tasks.get(task, {})
            lines.append(f'| {subset} | {task} | {points(m.get("top1_accuracy"))} | '
                         f'{points(m.get(f"top{k}_accuracy"))} | '
                         f'{points(m.get(f"mean_top{k}_recall"))} |')
    return lines


def _key_values(title: str, values: dict[str, Any]) -> list[str]:
    lines = [f'## {title}', '']
    for key, value in values.items():
        if isinstance(value, float):
            value = f'{value:.4g}'
        lines.append(f'- {key}: {value}')
    return [*lines, '']


def write_report(folder: str | os.PathLike, evaluation: Evaluation, *,
                 record: dict[str, Any] | None = None) -> list[Path]:
    """summary.md and the PNG plots of `evaluation` in `folder` (created); returns the files.

    `record` is the metrics record to summarise (default: evaluation.to_dict()); live mode
    passes one with its stream counts, latency and gap to direct mode.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = record if record is not None else evaluation.to_dict()
    written: list[Path] = []
    plots: list[tuple[str, str]] = []
    metrics = evaluation.metrics
    if metrics is not None:
        for task in TASKS:
            name = f'recall_{task}s.png'
            written.append(_recall_plot(evaluation, task, folder / name))
            plots.append((f'Per-class top-5 recall, {task}s', name))
        written.append(_confusion_plot(evaluation, folder / 'confusion_verbs.png'))
        plots.append(('Confusion of the most frequent verbs', 'confusion_verbs.png'))
    latency = evaluation.latency_ms
    if latency is not None and np.isfinite(latency).any():
        written.append(_latency_plot(latency, f'{evaluation.mode}: end-to-end latency, frame '
                                     'published to prediction received', folder /
                                     'latency_hist.png'))
        plots.append(('End-to-end latency', 'latency_hist.png'))

    inputs = record.get('inputs', {})
    where = inputs.get('video_id') or inputs.get('features') or ''
    lines = [f'# malmm-eval: {evaluation.mode} mode{f" on {where}" if where else ""}', '']
    if not evaluation.trained:
        lines += [f'> **UNTRAINED checkpoint** ({evaluation.checkpoint}): these numbers are '
                  'chance-level. It holds seeded random weights (malmm-export checkpoint '
                  '--untrained) and only shows that the tools run; train one with malmm-train.',
                  '']
    lines += [f'Created {record.get("created", "")}; ran {record.get("runtime_s", 0):.1f} s.',
              '']
    lines += _key_values('Inputs', inputs)
    lines += _key_values('Settings', record.get('settings', {}))
    lines += _key_values('Segments', record.get('segments', {}))
    if metrics is not None:
        lines += ['## Metrics (%)', '',
                  'Segments without a prediction count as misses. Tail: verbs on tail-verb '
                  'segments, nouns on tail-noun segments, actions on segments with a tail verb '
                  'or noun (the official rule).', '', *_metrics_table(metrics), '']
    else:
        lines += ['## Metrics', '', 'None: the segments carry no verb/noun classes (test '
                  'timestamps); see submission.json.', '']
    for key, title in (('stream', 'Live stream'), ('latency_ms', 'End-to-end latency (ms)')):
        if isinstance(record.get(key), dict):
            lines += _key_values(title, record[key])
    if isinstance(record.get('gap_to_direct'), dict):
        lines += ['## Gap to direct mode (percentage points, live - direct)', '',
                  *_gap_table(record['gap_to_direct']), '']
    if isinstance(record.get('arrival_metrics'), dict):
        lines += ['## Metrics by arrival time (%)', '',
                  'Each prediction placed at the video time it reached the evaluator, so '
                  'latency costs too.', '', *_metrics_table(record['arrival_metrics']), '']
    for title, name in plots:
        lines += [f'## {title}', '', f'![{title}]({name})', '']
    summary = folder / 'summary.md'
    summary.write_text('\n'.join(lines).rstrip() + '\n')
    return [summary, *written]

