"""Executors: evaluate batches of recipes — serially, in a process pool, or on Ray.

A worker (:class:`Worker`) holds one resident model, loaded once by the loader the config
names, plus the source models and the tasks. For each :class:`WorkItem` it builds the
candidate *in place* into the resident model (:func:`build_candidate`: a merge written
with ``copy_``, a layer path sharing the sources' layers, a stored model, a random init),
scores it on every task and returns per-example scores, seconds and its id. Recipes and
scores travel; weights do not. Models an algorithm refers to later live in a
content-addressed :class:`ModelStore` (``store:<key>``). Same items, same seeds: the same
scores on every executor.
"""

from __future__ import annotations

from typing import Any

from shoal.executors.base import Executor
from shoal.executors.build import SourceMap, build_candidate, generator_for
from shoal.executors.store import DirStore, MemoryStore, ModelStore, open_store
from shoal.executors.work import WorkerSpec, WorkItem, WorkResult, candidate_seed

__all__ = [
    "EXECUTORS",
    "DirStore",
    "Executor",
    "MemoryStore",
    "ModelStore",
    "SourceMap",
    "WorkItem",
    "WorkResult",
    "WorkerSpec",
    "build_candidate",
    "candidate_seed",
    "generator_for",
    "make_executor",
    "open_store",
]

EXECUTORS = ("serial", "process", "ray")


def make_executor(
    kind: str,
    spec: WorkerSpec,
    *,
    store: ModelStore | None = None,
    workers: int = 2,
    address: str | None = None,
    max_retries: int = 2,
    gpus_per_worker: float = 0.0,
    ray_init: dict[str, Any] | None = None,
    connect_timeout: float = 30.0,
) -> Executor:
    """Build an executor by name (``serial``, ``process``, ``ray``).

    Args:
        kind: Executor name.
        spec: What each worker loads.
        store: The store object (serial only; other executors open ``spec.store``).
        workers: Processes or actors.
        address: Ray cluster address.
        max_retries: Resubmissions of an item whose worker died.
        gpus_per_worker: Ray GPUs per actor.
        ray_init: Extra ``ray.init`` keyword arguments for a local instance.
        connect_timeout: Seconds a Ray ``address`` has to answer.
    """
    if kind == "serial":
        from shoal.executors.serial import SerialExecutor

        return SerialExecutor(spec, store)
    if kind == "process":
        from shoal.executors.process import ProcessExecutor

        return ProcessExecutor(spec, workers=workers, max_retries=max_retries)
    if kind == "ray":
        from shoal.executors.ray_executor import RayExecutor

        return RayExecutor(
            spec,
            workers=workers,
            address=address,
            max_retries=max_retries,
            num_gpus=gpus_per_worker,
            init_kwargs=ray_init,
            connect_timeout=connect_timeout,
        )
    from shoal.errors import RecipeError

    raise RecipeError(f"executor.type: unknown executor {kind!r} (serial, process, ray)")
