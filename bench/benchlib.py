"""What the benchmarks share: the machine they ran on, memory use, markdown tables and targets.

The scripts run as `python bench/NAME.py` from the repository root, which puts this folder on
sys.path: they import this module as `benchlib`.
"""

from __future__ import annotations

import gc
import math
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() as a fallback)."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def rss_mb(pid: int | None = None) -> float:
    """Resident set size (VmRSS) in MB of process `pid`; of this process after a full garbage
    collection when `pid` is None. NaN once the process is gone."""
    if pid is None:
        gc.collect()
    try:
        status = Path(f'/proc/{pid or "self"}/status').read_text()
    except OSError:
        return math.nan
    for line in status.splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
    return math.nan


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other processes competing for the cores)."""
    try:
        return ' '.join(f'{load:.2f}' for load in os.getloadavg())
    except OSError:
        return 'n/a'


def fmt(value: float | None, digits: int = 2) -> str:
    return 'n/a' if value is None or not math.isfinite(value) else f'{value:.{digits}f}'


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(str(cell) for cell in row) + ' |' for row in rows]
    return '\n'.join(lines)


def machine(**extra: object) -> str:
    """A one-row table of this machine and software; `extra` adds columns (name=value)."""
    import torch  # here: node_bench needs no torch otherwise

    header = ['CPU', 'cores', 'torch', 'Python', *(name.replace('_', ' ') for name in extra)]
    row = [cpu_model(), os.cpu_count(), torch.__version__, platform.python_version(),
           *extra.values()]
    return table(header, [row])


def targets(rows: Iterable[tuple[str, str, bool]]) -> str:
    """The '## Targets' section: one row per (target, what was measured, met)."""
    verdicts = [(target, measured, 'met' if ok else '**not met**')
                for target, measured, ok in rows]
    return '## Targets\n\n' + table(['target', 'measured', 'verdict'], verdicts)
