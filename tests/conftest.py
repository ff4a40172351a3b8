"""Shared test set-up: the helpers beside the tests (procs, streams, vectors) import as modules."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
