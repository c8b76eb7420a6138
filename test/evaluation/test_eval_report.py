"""Report outputs: metrics JSON, summary.md and PNG plots that are real images."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from malmm_ros.data.epic import Segment, samples_from_segments
from malmm_ros.evaluation import (
    Evaluation,
    ScoreRows,
    latency_summary,
    metric_gap,
    score_segments,
    segment_metrics,
    write_metrics,
    write_report,
)
from malmm_ros.labels import LabelMaps

V, N = 8, 10
PAIRS = [(v, v + 1) for v in range(V)]
LABELS = LabelMaps.placeholder(V, N).with_actions(PAIRS)


CHECKPOINT = '/runs/train/checkpoint.safetensors'


def evaluation(*, labelled: bool = True, latency: bool = False, mode: str | None = None,
               trained: bool = True) -> Evaluation:
    """24 segments over 8 verbs; predictions right for the even verbs, wrong for the odd."""
    rng = np.random.default_rng(0)
    verbs = [i % V for i in range(24)]
    segments = [Segment(f'P0{1 + i % 2}_01_{i}', f'P0{1 + i % 2}', 'P01_01', 2.0 + i,
                        3.0 + i, verb_class=v if labelled else None,
                        noun_class=v + 1 if labelled else None)
                for i, v in enumerate(verbs)]
    samples = samples_from_segments(segments, 1.0, 10.0)
    guess = [v if v % 2 == 0 else (v + 1) % V for v in verbs]
    verb = rng.uniform(0, 0.01, size=(24, V)).astype(np.float32)
    noun = rng.uniform(0, 0.01, size=(24, N)).astype(np.float32)
    action = rng.uniform(0, 0.01, size=(24, V)).astype(np.float32)
    for i, g in enumerate(guess):
        verb[i, g] = noun[i, g + 1] = action[i, g] = 1.0
    rows = ScoreRows.from_dense(verb, noun, action, LABELS)
    scores = score_segments(samples, np.arange(24, dtype=np.float64) + 1.0, rows)
    metrics = (segment_metrics(scores, unseen_participants={'P02'}, tail_verbs={1},
                               tail_nouns={2}) if labelled else None)
    delays = rng.gamma(4.0, 5.0, size=24) if latency else None
    mode = mode or ('live' if latency else 'direct')
    return Evaluation(mode, scores, LABELS, metrics, {'tau_a': 1.0, 'sample_fps': 1.0},
                      {'video_id': 'P01_01'}, 1.5, latency_ms=delays, checkpoint=CHECKPOINT,
                      trained=trained)


def check_png(path: Path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n', f'{path} is not a PNG'
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 5, f'{path} is blank'
    return image


def test_report_files_exist_and_plots_are_images(tmp_path: Path) -> None:
    result = evaluation()
    files = write_report(tmp_path / 'report', result)
    names = sorted(p.name for p in files)
    assert names == ['confusion_verbs.png', 'recall_actions.png', 'recall_nouns.png',
                     'recall_verbs.png', 'summary.md']
    for path in files:
        if path.suffix == '.png':
            check_png(path)
    summary = (tmp_path / 'report' / 'summary.md').read_text()
    # Half of the segments are right at top 1: 50.0 % overall for verbs; every plot linked.
    assert '| overall | verb | 50.0 |' in summary
    assert '| unseen | verb |' in summary and '| tail | action |' in summary
    for name in names[:-1]:
        assert f']({name})' in summary
    assert 'latency' not in summary.lower()


def test_live_report_has_a_latency_histogram_and_the_gap(tmp_path: Path) -> None:
    result = evaluation(latency=True)
    direct = evaluation()
    record = result.to_dict()
    record['stream'] = {'published': 600, 'predictions': 24, 'dropped_by_node': 0}
    record['latency_ms'] = latency_summary(result.latency_ms)
    record['gap_to_direct'] = metric_gap(result.metrics, direct.metrics)
    files = write_report(tmp_path, result, record=record)
    assert (tmp_path / 'latency_hist.png') in files
    check_png(tmp_path / 'latency_hist.png')
    summary = (tmp_path / 'summary.md').read_text()
    assert '## Live stream' in summary and '- published: 600' in summary
    assert '## Gap to direct mode' in summary and '| overall | verb | +0.0 |' in summary
    assert f'- p50: {record["latency_ms"]["p50"]:.4g}' in summary


def test_without_labels_there_is_no_metric_and_no_plot(tmp_path: Path) -> None:
    result = evaluation(labelled=False)
    assert not result.scores.labelled
    files = write_report(tmp_path, result)
    assert [p.name for p in files] == ['summary.md']
    assert 'no verb/noun classes' in files[0].read_text()


def test_metrics_json_round_trip(tmp_path: Path) -> None:
    result = evaluation()
    record = result.to_dict()
    record['extra'] = {'count': np.int64(3), 'value': np.float32(0.5), 'path': tmp_path}
    path = write_metrics(tmp_path / 'metrics.json', record)
    loaded = json.loads(path.read_text())
    assert loaded['format'] == 'malmm_ros/eval/v1'
    assert loaded['metrics'] == json.loads(json.dumps(result.metrics))
    assert loaded['segments'] == {'segments': 24, 'scored': 24, 'no_observation': 0,
                                  'no_prediction': 0}
    assert loaded['extra'] == {'count': 3, 'value': 0.5, 'path': str(tmp_path)}


@pytest.mark.parametrize('mode', ['direct', 'features', 'live'])
@pytest.mark.parametrize('trained', [True, False])
def test_untrained_checkpoint_is_said_in_metrics_and_summary(tmp_path: Path, mode: str,
                                                             trained: bool) -> None:
    result = evaluation(mode=mode, latency=mode == 'live', trained=trained)
    record = result.to_dict()
    if mode == 'live':  # live mode adds its stream counts to the record, as live_eval does
        record['stream'] = {'published': 600, 'predictions': 24}
    loaded = json.loads(write_metrics(tmp_path / 'metrics.json', record).read_text())
    assert loaded['trained'] is trained
    assert loaded['checkpoint'] == CHECKPOINT
    write_report(tmp_path / 'report', result, record=record)
    lines = (tmp_path / 'report' / 'summary.md').read_text().splitlines()
    assert lines[0].startswith(f'# malmm-eval: {mode} mode')
    untrained = [i for i, line in enumerate(lines) if 'UNTRAINED checkpoint' in line]
    if trained:
        assert untrained == []
    else:  # right under the title, before any number
        assert untrained == [2]
        assert CHECKPOINT in lines[2] and 'chance-level' in lines[2]


def test_metric_gap_and_latency_summary() -> None:
    ours = {'overall': {'verb': {'top1_accuracy': 0.5, 'mean_top5_recall': None, 'count': 4}}}
    theirs = {'overall': {'verb': {'top1_accuracy': 0.75, 'mean_top5_recall': 0.5,
                                   'count': 4}}}
    gap = metric_gap(ours, theirs)
    assert gap == {'overall': {'verb': {'top1_accuracy': pytest.approx(-0.25),
                                        'mean_top5_recall': None}}}
    summary = latency_summary(np.array([10.0, 20.0, np.nan, 30.0]))
    assert summary == {'p50': 20.0, 'p95': 29.0, 'max': 30.0, 'count': 3}
    assert latency_summary(np.array([np.nan])) is None
