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


@pytest.mark.parametrize('memory', [4, 8, 20])
def test_streams_hold_both_cues_far_back_and_label_their_order(memory: int) -> None:
    bench = load_script()
    names = bench.CUE_PHOTOS + sys.modules['memory_ablation'].DISTRACTOR_PHOTOS
    rows = {(name, s): list(range(i * 5, i * 5 + 5))
            for i, (name, s) in enumerate((n, s) for n in names for s in range(6))}
    photo_of = {r: name for (name, _), rs in rows.items() for r in rs}
    streams, labels = bench.order_streams(rows, 60, range(4), memory, np.random.default_rng(3))
    assert labels.count(0) == labels.count(1) == 30  # both orders equally common
    for stream, label in zip(streams, labels, strict=True):
        assert len(stream) == 2 * memory + 16
        first = [i for i, r in enumerate(stream) if photo_of[r] == bench.FIRST]
        second = [i for i, r in enumerate(stream) if photo_of[r] == bench.SECOND]
        assert len(first) == len(second) == 2  # both cues, always: presence says nothing
        assert first[1] == first[0] + 1 and second[1] == second[0] + 1
        earlier, later = sorted((first, second))
        assert later[0] - earlier[1] - 1 >= 2  # distractors between the cues
        assert len(stream) - 1 - later[1] >= 2 * memory  # FIFO has dropped both
        assert label == (0 if first[0] < second[0] else 1)


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
