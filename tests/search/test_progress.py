"""The run's progress bar: updates at most every INTERVAL seconds, the last one always."""

from __future__ import annotations

import pytest

from shoal.search import progress as progress_module
from shoal.search.algorithms.base import Best
from shoal.search.config import Budget
from shoal.search.progress import RunProgress


class _Bar:
    def __init__(self) -> None:
        self.shown: list[tuple[int, str]] = []

    def add_task(self, label, total, completed, info):
        self.shown.append((completed, info))
        return 0

    def update(self, task, completed, info) -> None:
        self.shown.append((completed, info))

    def start(self) -> None: ...

    def stop(self) -> None: ...


def test_updates_are_thinned_and_the_last_one_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    bar, clock = _Bar(), [0.0]
    monkeypatch.setattr(progress_module, "status_bar", lambda: bar)
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    run = RunProgress("m2n2", Budget(evaluations=100))
    run.start(0, None)
    with run:
        for done in range(1, 8):  # 0.03 s apart: shown at 0.03 (the first), 0.15, then none
            clock[0] = 0.03 * done
            run.update(done, Best(recipe={}, fitness=done / 10, evaluation=done))
    assert bar.shown == [(0, "best -"), (1, "best 0.1000"), (5, "best 0.5000"), (7, "best 0.7000")]
