"""Fixtures shared across test folders."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_testbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` LM testbed (seed 0), built once per test process (~20 s)."""
    from shoal.testbed import build_testbed

    return build_testbed(tmp_path_factory.mktemp("tb") / "tiny", "tiny", seed=0, threads=1)
