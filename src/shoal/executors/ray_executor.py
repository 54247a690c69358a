"""The Ray executor: one resident model per Ray actor, on a local or remote Ray cluster.

``address=None`` starts (or joins) a local Ray instance; ``ray.init(address=...)`` joins a
real cluster, whose nodes must reach the model paths and the run's store directory. Items
are handed to idle actors as they free up; an actor that dies (``RayActorError``) is
replaced by a new one and its item resubmitted, at most ``max_retries`` times per item.
Requires the ``distributed`` extra.

``ray.init`` puts its own SIGTERM handler in place of the CLI's (and Ray's C++ core one
that prints a stack dump); the executor puts the previous one back, so SIGTERM unwinds
like Ctrl-C: :meth:`RayExecutor.close` shuts down the local instance it started and the
CLI exits with 130. A SIGKILL leaves no chance to: Ray's agents then linger for about a
minute and a half (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from shoal.errors import ShoalError
from shoal.executors.base import Executor
from shoal.executors.process import WorkerLost
from shoal.executors.work import WorkerSpec, WorkItem, WorkResult
from shoal.executors.worker import Worker

__all__ = ["RayExecutor"]


def check_reachable(address: str, timeout: float) -> None:
    """Refuse a cluster address that does not accept a connection within ``timeout`` s.

    ``ray.init(address=...)`` retries an unreachable address for many minutes; one TCP
    connection with a timeout tells the user at once. ``auto`` / ``local`` (Ray finds the
    address itself) pass unchecked.

    Raises:
        ShoalError: naming the address and why it cannot be reached.
    """
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if address in ("auto", "local") or not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except TimeoutError:
        raise ShoalError(
            f"executor.address: {address} did not answer within {timeout:g} s "
            "(executor.connect_timeout); is the Ray head running there?"
        ) from None
    except OSError as exc:
        raise ShoalError(
            f"executor.address: cannot reach {address} ({exc.strerror or exc}); "
            "is the Ray head running there?"
        ) from None


@contextlib.contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """Put back the SIGTERM handler that ``ray.init`` replaces.

    Ray's Python handler exits with status 15 and its C++ one prints a stack dump; the
    CLI's raises ``KeyboardInterrupt``, which runs :meth:`RayExecutor.close` on the way
    out. ``signal.signal`` installs the handler at the OS level again, over both.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if before is not None:  # None: not set from Python, nothing to put back
            signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Note SIGINT and SIGTERM during the block and raise the first one after it.

    A mask would not do: a signal may land on one of Ray's threads, and Python runs its
    handler in the main thread all the same.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    before = {
        signum: signal.signal(signum, lambda signum, frame: got.append(signum))
        for signum in (signal.SIGINT, signal.SIGTERM)
        if signal.getsignal(signum) is not None  # None: not Python's to replace
    }
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
        if got:
            signal.raise_signal(got[0])


class _ActorWorker:
    """The body of a Ray actor: a :class:`Worker` named after the actor."""

    def __init__(self, spec: WorkerSpec, name: str) -> None:
        self.worker = Worker(spec, worker_id=name)

    def evaluate(self, item: WorkItem) -> WorkResult:
        return self.worker.evaluate(item)


class RayExecutor(Executor):
    """Evaluates items on Ray actors.

    Args:
        spec: The worker spec (store: a directory every node reaches).
        workers: Number of actors.
        address: Ray cluster address, or ``None`` for a local instance.
        max_retries: Resubmissions of an item whose actor died.
        num_cpus: CPUs per actor.
        num_gpus: GPUs per actor.
        init_kwargs: Extra keyword arguments for ``ray.init`` (local instance only).
        connect_timeout: Seconds to wait for ``address`` to answer before giving up.

    Raises:
        ShoalError: Ray is not installed, or ``address`` does not answer in time.
    """

    kind = "ray"

    def __init__(
        self,
        spec: WorkerSpec,
        workers: int = 2,
        address: str | None = None,
        max_retries: int = 2,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        init_kwargs: dict[str, Any] | None = None,
        connect_timeout: float = 30.0,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ShoalError(
                "executor ray needs the `distributed` extra (pip install ray)"
            ) from None
        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            kwargs.update(init_kwargs or {})
            if address is not None:
                check_reachable(address, connect_timeout)
            with _keep_sigterm_handler():
                if address is not None:
                    ray.init(
                        address=address, **{k: v for k, v in kwargs.items() if k != "num_cpus"}
                    )
                else:
                    ray.init(**kwargs)
            self._owns_ray = True
        self.spec = spec
        self.max_retries = max_retries
        self.restarts = 0
        self._remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(
            _ActorWorker
        )
        self._count = 0
        self.actors = [self._new_actor() for _ in range(workers)]

    def _new_actor(self) -> Any:
        self._count += 1
        return self._remote.remote(self.spec, f"ray-actor-{self._count}")

    def evaluate(self, items: Sequence[WorkItem]) -> list[WorkResult]:
        """Hand items to idle actors; replace dead actors and resubmit their items."""
        ray = self._ray
        from ray.exceptions import RayActorError

        results: dict[int, WorkResult] = {}
        tries = dict.fromkeys(range(len(items)), 0)
        queue = list(range(len(items)))
        running: dict[Any, tuple[int, int]] = {}  # object ref -> (item position, actor slot)
        idle = list(range(len(self.actors)))
        while queue or running:
            while queue and idle:
                k, slot = queue.pop(0), idle.pop(0)
                running[self.actors[slot].evaluate.remote(items[k])] = (k, slot)
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                k, slot = running.pop(ref)
                try:
                    results[k] = ray.get(ref)
                except RayActorError:
                    tries[k] += 1
                    if tries[k] > self.max_retries:
                        raise WorkerLost(
                            f"work item {items[k].index} lost its Ray actor {tries[k]} times"
                        ) from None
                    self.actors[slot] = self._new_actor()
                    self.restarts += 1
                    queue.insert(0, k)
                idle.append(slot)
        return [results[k] for k in range(len(items))]

    def close(self) -> None:
        """Kill the actors; shut Ray down if this executor started it."""
        for actor in self.actors:
            with contextlib.suppress(Exception):  # an already dead actor
                self._ray.kill(actor)
        self.actors = []
        if self._owns_ray:
            with _signals_deferred():  # a second Ctrl-C or SIGTERM must not cut it short
                self._ray.shutdown()
