"""The toy problem of tests/search is shared with the executor tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

SEARCH_TESTS = str(Path(__file__).resolve().parents[1] / "search")
if SEARCH_TESTS not in sys.path:
    sys.path.insert(0, SEARCH_TESTS)
# worker processes and Ray actors import the toy loader/tasks by module name
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (SEARCH_TESTS, os.environ.get("PYTHONPATH")) if p
)
