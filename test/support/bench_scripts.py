"""Load a bench/ script as a module, the way `python bench/NAME.py` runs it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / 'bench'


def load_bench_script(name: str) -> ModuleType:
    """bench/<name>.py as module `name`, with bench/ on sys.path (for benchlib and siblings)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and worker processes look it up by this name
    spec.loader.exec_module(module)
    return module
