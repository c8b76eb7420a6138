"""bench/sequence_bench.py: its streams ask for order only, and it runs end to end on a tiny
budget (the full run is a benchmark)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from support.bench_scripts import load_bench_script


def load_script():
    return load_bench_script('sequence_bench')


def _rows(bench) -> tuple[dict, dict]:
    """Five frame ids per (photo, shot), and the photo of every id."""
    names = bench.CUE_PHOTOS + sys.modules['memory_ablation'].DISTRACTOR_PHOTOS
    rows = {(name, s): list(range(i * 5, i * 5 + 5))
            for i, (name, s) in enumerate((n, s) for n in names for s in range(6))}
    return rows, {r: name for (name, _), rs in rows.items() for r in rs}


@pytest.mark.parametrize('memory', [4, 8, 20])
@pytest.mark.parametrize('task', ['which-first', 'next-step'])
def test_streams_hold_every_cue_far_back_and_label_their_order(task: str, memory: int) -> None:
    bench = load_script()
    rows, photo_of = _rows(bench)
    photos = bench.TASKS[task][0]
    streams, labels = bench.order_streams(rows, 60, range(4), memory, np.random.default_rng(3),
                                          task)
    # Every label equally common; for next-step every one of the six orders too.
    assert [labels.count(k) for k in range(len(photos))] == [60 // len(photos)] * len(photos)
    orders = []
    for stream, label in zip(streams, labels, strict=True):
        assert len(stream) == 2 * memory + 8 + 4 * len(photos)
        at = {name: [i for i, r in enumerate(stream) if photo_of[r] == name] for name in photos}
        for seen in at.values():
            assert len(seen) == 2 and seen[1] == seen[0] + 1  # each cue, always: 2 frames
        order = sorted(photos, key=lambda name: at[name][0])
        for earlier, later in zip(order[:-1], order[1:], strict=True):
            assert at[later][0] - at[earlier][1] - 1 >= 2  # distractors between the cues
        assert len(stream) - 1 - at[order[-1]][1] >= 2 * memory  # FIFO has dropped them all
        if task == 'which-first':
            assert label == (0 if at[photos[0]][0] < at[photos[1]][0] else 1)
        else:  # a rotation of A -> B -> C, either way round; next comes the first one seen
            start = photos.index(order[0])
            forwards = [photos[(start + k) % 3] for k in range(3)]
            backwards = [photos[(start - k) % 3] for k in range(3)]
            assert order in (forwards, backwards)
            assert label == start
        orders.append(tuple(order))
    if task == 'next-step':
        assert {orders.count(o) for o in set(orders)} == {10} and len(set(orders)) == 6


@pytest.mark.slow  # the benchmark end to end, one worker process
def test_tiny_run_writes_results_and_reports_them(tmp_path: Path, capsys) -> None:
    bench = load_script()
    before = torch.get_num_threads()
    try:
        code = bench.main(['--memory', '4', '--seeds', '1', '--epochs', '1', '--train-streams',
                           '16', '--test-streams', '8', '--jobs', '1', '--variants', 'none',
                           'mbc-v1', 'mbc', '--out', str(tmp_path)])
    finally:
        torch.set_num_threads(before)
    assert code == 0
    result = json.loads((tmp_path / 'sequence.json').read_text())
    assert set(result['results']['4']) == {'none', 'mbc-v1', 'mbc'}
    assert all(0.0 <= a <= 1.0 for accs in result['results']['4'].values() for a in accs)
    assert (tmp_path / 'sequence.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert '| 4 | mbc |' in capsys.readouterr().out
    assert result['task'] == 'which-first'
    # A run's results so far print again from the JSON alone.
    (tmp_path / 'sequence.png').unlink()
    assert bench.main(['--report', '--out', str(tmp_path)]) == 0
    assert '| 4 | mbc-v1 |' in capsys.readouterr().out
    assert (tmp_path / 'sequence.png').exists()


@pytest.mark.slow  # two tiny runs
def test_resume_trains_only_the_missing_runs(tmp_path: Path) -> None:
    bench = load_script()
    tiny = ['--memory', '4', '--seeds', '1', '--epochs', '1', '--train-streams', '16',
            '--test-streams', '8', '--jobs', '1', '--out', str(tmp_path)]
    before = torch.get_num_threads()
    try:
        assert bench.main([*tiny, '--variants', 'none']) == 0
        path = tmp_path / 'sequence.json'
        first = json.loads(path.read_text())
        # Mark the finished run so that training it again would show.
        first['results']['4']['none'] = [0.123]
        path.write_text(json.dumps(first))
        assert bench.main([*tiny, '--variants', 'none', 'pool', '--resume']) == 0
        resumed = json.loads(path.read_text())
        assert resumed['results']['4']['none'] == [0.123]
        assert 0.0 <= resumed['results']['4']['pool'][0] <= 1.0
        with pytest.raises(SystemExit):  # other settings: refused, the file left alone
            bench.main([*tiny[:5], '2', *tiny[6:], '--variants', 'none', '--resume'])
        assert json.loads(path.read_text()) == resumed
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow  # one tiny run of the three-cue task
def test_tiny_next_step_run_has_three_classes(tmp_path: Path, capsys) -> None:
    bench = load_script()
    before = torch.get_num_threads()
    try:
        assert bench.main(['--task', 'next-step', '--memory', '4', '--seeds', '1', '--epochs',
                           '1', '--train-streams', '12', '--test-streams', '6', '--jobs', '1',
                           '--variants', 'mbc', '--out', str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(before)
    result = json.loads((tmp_path / 'sequence.json').read_text())
    assert result['task'] == 'next-step' and 0.0 <= result['results']['4']['mbc'][0] <= 1.0
    out = capsys.readouterr().out
    assert 'next-step (the step after A -> B -> C)' in out and 'chance 33 %' in out
    with pytest.raises(SystemExit):  # resuming it as the other task is refused
        bench.main(['--memory', '4', '--seeds', '1', '--epochs', '1', '--train-streams', '12',
                    '--test-streams', '6', '--variants', 'mbc', '--out', str(tmp_path),
                    '--resume'])
