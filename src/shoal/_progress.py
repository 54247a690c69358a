"""The rich progress bars of shoal's long loops: one look for every command.

Two kinds: :func:`counting_bar`, a transient bar on stderr that counts items (tensors
merged, modules factorised) and leaves stdout to the command's own output, and
:func:`status_bar`, a bar that stays and ends in one text field, ``info``, for a loop
that has a figure to show (the best fitness of a search, a training's loss). rich is
imported only when a bar is made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

__all__ = ["counting_bar", "phase_bars", "status_bar"]


def counting_bar(enabled: bool) -> Any:
    """A transient ``description, bar, done/total, elapsed`` bar on stderr, or, when not
    ``enabled``, a context that does nothing (no ``add_task``: guard the calls)."""
    if not enabled:
        return nullcontext()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def status_bar(console: Any = None) -> Any:
    """A ``description, bar, done/total, elapsed, info`` bar; give each task an ``info``
    field (``add_task(..., info="")``) and update it as the loop goes. ``console``: a rich
    console to draw on (default stdout)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        # redrawn twice a second, not ten times: drawing holds the GIL, and at ten a
        # second it cost the digits search 3-10 % of its candidates
        refresh_per_second=2,
    )


@contextmanager
def phase_bars() -> Iterator[Callable[[str, int, int], None]]:
    """A :func:`status_bar` on stderr with one bar per phase of a build, as the callback the
    testbed builders take: ``progress(phase, done, total)`` adds the phase's bar on first
    sight. stdout stays for the build's own report."""
    from rich.console import Console

    with status_bar(Console(stderr=True)) as bar:
        bars: dict[str, Any] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in bars:
                bars[phase] = bar.add_task(phase, total=total, info="")
            bar.update(bars[phase], completed=done)

        yield progress
