"""bench/benchlib.py: the machine, memory and markdown helpers every benchmark prints with."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / 'bench'
if str(BENCH) not in sys.path:  # as `python bench/NAME.py` has it
    sys.path.insert(0, str(BENCH))

import benchlib  # noqa: E402


def test_table_is_markdown() -> None:
    text = benchlib.table(['a', 'b'], [[1, 'x'], [2.5, '']])
    assert text.splitlines() == ['| a | b |', '|---|---|', '| 1 | x |', '| 2.5 |  |']


def test_targets_say_met_or_not_met() -> None:
    lines = benchlib.targets([('fast', '3 ms', True), ('small', '9 MB', False)]).splitlines()
    assert lines[0] == '## Targets'
    assert lines[2:] == ['| target | measured | verdict |', '|---|---|---|',
                         '| fast | 3 ms | met |', '| small | 9 MB | **not met** |']


@pytest.mark.parametrize(('value', 'digits', 'expected'),
                         [(1.234, 2, '1.23'), (2.0, 0, '2'), (math.nan, 2, 'n/a'),
                          (None, 1, 'n/a'), (math.inf, 1, 'n/a')])
def test_fmt(value: float | None, digits: int, expected: str) -> None:
    assert benchlib.fmt(value, digits) == expected


def test_rss_of_this_process_and_of_a_child() -> None:
    assert benchlib.rss_mb() > 1.0
    child = subprocess.Popen([sys.executable, '-c', 'import time; print(1, flush=True); '
                              'time.sleep(30)'], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline()  # the interpreter is up
        assert benchlib.rss_mb(child.pid) > 1.0
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert math.isnan(benchlib.rss_mb(child.pid))  # reaped: no /proc entry


def test_machine_row_names_this_machine() -> None:
    header, _, row = benchlib.machine(torch_threads=3).splitlines()
    assert header == '| CPU | cores | torch | Python | torch threads |'
    cells = [cell.strip() for cell in row.strip('|').split('|')]
    assert cells[0] == benchlib.cpu_model() and cells[0]
    assert cells[1] == str(os.cpu_count()) and cells[4] == '3'
