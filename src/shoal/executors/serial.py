"""The serial executor: one worker in the calling process."""

from __future__ import annotations

from collections.abc import Sequence

from shoal.executors.base import Executor
from shoal.executors.store import ModelStore
from shoal.executors.work import WorkerSpec, WorkItem, WorkResult
from shoal.executors.worker import Worker

__all__ = ["SerialExecutor"]


class SerialExecutor(Executor):
    """Evaluates items one after another in this process (shares the runner's store).

    Args:
        spec: The worker spec.
        store: The run's model store (in memory).
    """

    kind = "serial"

    def __init__(self, spec: WorkerSpec, store: ModelStore | None = None) -> None:
        self.worker = Worker(spec, store=store, worker_id="serial")

    def evaluate(self, items: Sequence[WorkItem]) -> list[WorkResult]:
        """Evaluate in order."""
        return [self.worker.evaluate(item) for item in items]

    def close(self) -> None:
        """Give this process back the torch thread count the worker found."""
        self.worker.close()
