"""bench/memory_ablation.py runs end to end on a tiny budget (the full run is a benchmark)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from support.bench_scripts import load_bench_script


def load_script():
    return load_bench_script('memory_ablation')


def test_streams_put_the_cue_at_least_four_m_before_the_end() -> None:
    ablation = load_script()
    rows = {(name, s): list(range(i * 5, i * 5 + 5)) for i, (name, s) in enumerate(
        (n, s) for n in ablation.CUE_PHOTOS + ablation.DISTRACTOR_PHOTOS for s in range(6))}
    cue_rows = {r for (name, _), rs in rows.items() if name in ablation.CUE_PHOTOS for r in rs}
    spec = ablation.StreamSpec(length=24, gap=16)
    streams, labels = ablation.make_streams(rows, 40, range(4), spec, np.random.default_rng(0))
    for stream, label in zip(streams, labels, strict=True):
        assert len(stream) == 24
        cues = [i for i, r in enumerate(stream) if r in cue_rows]
        assert len(cues) == 2 and cues[1] == cues[0] + 1
        assert len(stream) - 1 - cues[1] >= 16
        cue_photo = next(name for (name, _), rs in rows.items() if stream[cues[0]] in rs)
        assert ablation.CUE_PHOTOS.index(cue_photo) == label


@pytest.mark.slow  # the ablation script end to end
def test_tiny_run_writes_results(tmp_path: Path, capsys) -> None:
    ablation = load_script()
    before = torch.get_num_threads()
    try:
        code = ablation.main(['--seeds', '1', '--epochs', '1', '--train-streams', '16',
                              '--test-streams', '8', '--threads', '1', '--variants', 'none',
                              'mbc', '--out', str(tmp_path)])
    finally:
        torch.set_num_threads(before)
    assert code == 0
    result = json.loads((tmp_path / 'ablation.json').read_text())
    assert set(result['results']) == {'none', 'mbc'}
    assert all(0.0 <= a <= 1.0 for accs in result['results'].values() for a in accs)
    assert (tmp_path / 'ablation.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert '| mbc |' in capsys.readouterr().out
