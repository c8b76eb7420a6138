"""The evaluation tests use the tiny EK-format dataset writer of test/epic."""

from __future__ import annotations

import sys
from pathlib import Path

EPIC_TESTS = str(Path(__file__).resolve().parents[1] / 'epic')
if EPIC_TESTS not in sys.path:
    sys.path.insert(0, EPIC_TESTS)
