"""The process-pool executor: one resident model per worker process.

Processes start with ``spawn`` (no forked torch state; a script that runs a search
must guard its entry point with ``if __name__ == "__main__":``), ignore Ctrl-C (the runner decides
when to stop) and use ``threads`` torch threads each. A worker that dies (segfault, OOM
kill, ``os._exit``) breaks the pool: the pool is rebuilt and the unfinished items are
submitted again, each at most ``max_retries`` times. A worker whose run dies (``kill -9``)
leaves with it instead of idling for good with its model in memory.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from shoal.errors import ShoalError
from shoal.executors.base import Executor
from shoal.executors.work import WorkerSpec, WorkItem, WorkResult
from shoal.executors.worker import Worker

__all__ = ["ProcessExecutor", "WorkerLost"]

_WORKER: Worker | None = None
_INIT_ERROR: BaseException | None = None


class WorkerLost(ShoalError):
    """Work items kept killing their workers beyond the retry limit."""


def _leave_with_parent() -> None:
    """Exit when the process that started this worker is gone, however it ended: an idle
    pool worker waits on a queue whose pipe a killed parent does not close, so it would
    stay for good. The spawn start method hands each child a sentinel of its parent that
    becomes ready when the parent exits; a daemon thread waits on it."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="shoal-leave-with-parent", daemon=True).start()


def _init_worker(spec: WorkerSpec) -> None:
    global _WORKER, _INIT_ERROR
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _leave_with_parent()
    try:
        _WORKER = Worker(spec)
    except Exception as exc:  # reported by the first item, not as a broken pool
        _INIT_ERROR = exc


def _evaluate(item: WorkItem) -> WorkResult:
    if _INIT_ERROR is not None:
        raise _INIT_ERROR
    assert _WORKER is not None, "worker process not initialised"
    return _WORKER.evaluate(item)


class ProcessExecutor(Executor):
    """Evaluates items in a pool of worker processes.

    Args:
        spec: The worker spec (the store must be a directory every process reaches).
        workers: Number of processes.
        max_retries: Resubmissions of an item whose worker died.
    """

    kind = "process"

    def __init__(self, spec: WorkerSpec, workers: int = 2, max_retries: int = 2) -> None:
        self.spec = spec
        self.workers = workers
        self.max_retries = max_retries
        self.restarts = 0
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=mp.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.spec,),
            )
        return self._pool

    def _discard_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self.restarts += 1

    def evaluate(self, items: Sequence[WorkItem]) -> list[WorkResult]:
        """Evaluate in parallel; resubmit the items of a worker that died."""
        results: dict[int, WorkResult] = {}
        tries = dict.fromkeys(range(len(items)), 0)
        while len(results) < len(items):
            pool = self._get_pool()
            todo = [k for k in range(len(items)) if k not in results]
            futures: dict[Future[WorkResult], int] = {}
            try:
                for k in todo:
                    futures[pool.submit(_evaluate, items[k])] = k
            except BrokenProcessPool:
                pass
            wait(futures, return_when=FIRST_EXCEPTION)
            wait(futures)
            broken = False
            for fut, k in futures.items():
                exc = fut.exception()
                if exc is None:
                    results[k] = fut.result()
                elif isinstance(exc, BrokenProcessPool):
                    broken = True
                    tries[k] += 1
                    if tries[k] > self.max_retries:
                        raise WorkerLost(
                            f"work item {items[k].index} lost its worker {tries[k]} times; "
                            "giving up (a task or recipe crashes the process)"
                        )
                else:
                    raise exc
            if broken or len(futures) < len(todo):
                self._discard_pool()
        return [results[k] for k in range(len(items))]

    def close(self) -> None:
        """Shut the pool down."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
