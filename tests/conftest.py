"""Fixtures shared across test folders."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_testbed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` LM testbed (seed 0), built once per test process (~20 s)."""
    from shoal.testbed import build_testbed

    return build_testbed(tmp_path_factory.mktemp("tb") / "tiny", "tiny", seed=0, threads=1)


CliRun = Callable[..., tuple[int, str, str]]


@pytest.fixture
def shoal_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> CliRun:
    """Run ``shoal ARGS`` in this process (fast), optionally in ``cwd``.

    Returns ``run(args, cwd=None) -> (exit code, stdout, stderr)``.
    """
    from shoal.cli.main import main

    def run(args: Sequence[str], cwd: Path | None = None) -> tuple[int, str, str]:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["shoal", *args])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
