"""A rich progress bar over evaluations that shows the current best fitness."""

from __future__ import annotations

import math
import time
from types import TracebackType
from typing import Any

from shoal._progress import status_bar
from shoal.search.algorithms.base import Best
from shoal.search.config import Budget

__all__ = ["INTERVAL", "RunProgress"]

#: seconds between two updates of the bar
INTERVAL = 0.1


class RunProgress:
    """Progress of one stage; a no-op when disabled."""

    def __init__(self, label: str, budget: Budget, *, enabled: bool = True) -> None:
        self.label = label
        self.total = budget.evaluations
        self.enabled = enabled
        self._progress: Any = None
        self._task: Any = None
        self._latest: tuple[int, Best | None] = (0, None)
        self._shown_at = -math.inf

    def start(self, done: int, best: Best | None) -> None:
        """Create the bar at ``done`` evaluations."""
        if not self.enabled:
            return
        self._latest = (done, best)
        self._progress = status_bar()
        self._task = self._progress.add_task(
            self.label, total=self.total, completed=done, info=self._fmt(best)
        )

    @staticmethod
    def _fmt(best: Best | None) -> str:
        return "best -" if best is None else f"best {best.fitness:.4f}"

    def update(self, done: int, best: Best | None) -> None:
        """Move the bar to ``done`` and show ``best`` (at most every :data:`INTERVAL`
        seconds: the loop calls this after each batch, up to ~800 times a second)."""
        if self._progress is None:
            return
        self._latest = (done, best)
        now = time.monotonic()
        if now - self._shown_at >= INTERVAL:
            self._show()
            self._shown_at = now

    def _show(self) -> None:
        done, best = self._latest
        self._progress.update(self._task, completed=done, info=self._fmt(best))

    def __enter__(self) -> RunProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._show()  # the last update, however soon after the one before
            self._progress.stop()
