"""Assertions the command-line tests share: one error line, and nothing left behind.

Imported by name (``from cli_helpers import ...``) from the tests beside it.
"""

from __future__ import annotations

from pathlib import Path


def one_error_line(err: str, *needles: str) -> str:
    """The one non-empty stderr line, checked to start with ``error: `` and to hold every
    needle."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def nothing_left(out: Path) -> None:
    """No output folder and no temporary sibling of it (``.OUT.*``)."""
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
