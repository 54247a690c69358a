"""A worker: a resident model, the source models, the tasks; scores work items.

The same class runs in the main process (serial executor), in each process of the pool and
inside each Ray actor, so every executor computes the same numbers for the same items.
"""

from __future__ import annotations

import functools
import os
import socket
import time
import traceback
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal.errors import CheckpointError, TaskError
from shoal.executors.build import SourceLoadError, SourceMap, build_candidate
from shoal.executors.flat import FlatModel, FlatVector
from shoal.executors.loaders import load_resident
from shoal.executors.store import ModelStore, distinct_tensors, open_store
from shoal.executors.threads import ThreadChooser, same_at_any_count
from shoal.executors.work import WorkerSpec, WorkItem, WorkResult
from shoal.tasks.base import Task, check_scores
from shoal.tasks.registry import TaskEnv, add_task

__all__ = ["VECTOR_CACHE_BYTES", "Worker", "load_tensors"]

#: memory for the flat vectors of the models a small model's children are built from, 16
#: bytes a parameter (float32 and float64 copies, and the tensors they were made from,
#: which an entry keeps alive): 64 MiB keep 218 of the digits MLP's (M2N2 needs its
#: archive's 20) and none of a model over 4.2 M parameters, whose build and scoring
#: outweigh making its parents' vectors again
VECTOR_CACHE_BYTES = 64 * 2**20


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (HF dir, .safetensors, .pt/.bin), on the CPU.

    Raises:
        CheckpointError: A tensor holds NaN/Inf (checked once here, not per candidate).
    """
    from shoal.checkpoint import check_finite, open_checkpoint

    with open_checkpoint(path) as reader:
        out = {name: reader.get(name) for name in reader}
    for name, tensor in out.items():
        check_finite(tensor, name=name, source=str(path))
    return out


def _load_in_model_order(
    order: tuple[str, ...], tied: frozenset[str], path: str
) -> dict[str, torch.Tensor]:
    """A source's tensors in the resident model's order, its tied aliases left out.

    A file lists its tensors in its own order (safetensors: by name), a stored model
    in the module's; a ``splitpoint`` flattens model A in A's key order, so every
    source is put in the module's order for a split to mean the same on any parent.
    Names the model lacks follow in file order.
    """
    loaded = load_tensors(path)
    ordered = {k: loaded[k] for k in order if k in loaded}
    ordered.update((k, v) for k, v in loaded.items() if k not in ordered and k not in tied)
    return ordered


class Worker:
    """Builds candidates into one resident model and scores them.

    Args:
        spec: What to load (see :class:`WorkerSpec`).
        store: The model store; default: opened from ``spec.store``.
        worker_id: Name reported in results (default ``host:pid``).
    """

    def __init__(
        self, spec: WorkerSpec, store: ModelStore | None = None, worker_id: str | None = None
    ) -> None:
        # the testbed task type registers itself on import (testbed sits above tasks)
        import shoal.executors.testbed_task  # noqa: F401

        #: the process's torch thread count before this worker set its own (see close)
        self.threads_before = torch.get_num_threads()
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        try:
            self._load(spec, store, worker_id)
        except BaseException:  # a worker that never was leaves the count as it found it
            self.close()
            raise

    def _load(self, spec: WorkerSpec, store: ModelStore | None, worker_id: str | None) -> None:
        """The resident model, the store, the sources and the tasks (``__init__``'s body)."""
        self.spec = spec
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.model, self.tokenizer = load_resident(
            spec.loader, spec.models, spec.base_model, spec.device
        )
        self.store = store if store is not None else open_store(spec.store)
        # a tied weight (lm_head sharing the embeddings) is one tensor under two names;
        # stored models keep it under the first (distinct_tensors), so sources drop the
        # others too, whether save_pretrained left them out or torch.save kept them
        resident = self.model.state_dict(keep_vars=True)
        order = tuple(distinct_tensors(resident))
        tied = frozenset(resident) - frozenset(order)
        self.sources = SourceMap(
            spec.models, self.store, functools.partial(_load_in_model_order, order, tied)
        )
        if spec.store.get("path"):  # CycleQD's SVD factors: <run folder>/svd/
            self.sources.svd_dir = Path(spec.store["path"]).parent / "svd"
        self._env = TaskEnv(tokenizer=self.tokenizer, root=spec.root, device=spec.device)
        self.tasks: dict[str, Task] = {}
        for t in spec.tasks:
            add_task(self.tasks, t, self._env)
        self.fitness_names = tuple(self.tasks)
        self._extra_built = False
        self._hf: dict[str, Any] = {}
        self.flat = FlatModel.of(self.model)  # None: the model is too big or not plain
        # ref -> (the tensors it was made from, the vector); float32 and float64 copies
        self._vectors: OrderedDict[str, tuple[Any, FlatVector]] = OrderedDict()
        self._vectors_max = VECTOR_CACHE_BYTES // (16 * self.flat.n) if self.flat else 0
        self._built_flat = False  # the last build was flat (the model is its buffer)
        #: for a small model left to choose its threads: the count, chosen by timing
        self.threads: ThreadChooser | None = None
        if self.flat is not None and spec.threads is None:
            # a second thread helps a small MLP's scoring on a quiet host and ruins it on
            # a busy one (executors/threads.py), so the worker measures which it is; a
            # small model of other layers keeps one thread (its scores would change)
            if same_at_any_count(self.model):
                self.threads = ThreadChooser.for_host()
            else:
                self.threads = ThreadChooser((1,))

    def close(self) -> None:
        """Give the process back the torch thread count it had before this worker.

        A worker sets the count (``spec.threads``, or one thread for a small model that
        chooses its own), which would otherwise outlive it in the caller's process.
        """
        torch.set_num_threads(self.threads_before)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def task_names(self, include_extra: bool = False) -> tuple[str, ...]:
        """Names of the fitness tasks (and the extra/test ones if asked)."""
        if include_extra:
            self._build_extra()
            return tuple(self.tasks)
        return self.fitness_names

    def _build_extra(self) -> None:
        if not self._extra_built:
            for t in self.spec.extra_tasks:
                add_task(self.tasks, t, self._env)
            self._extra_built = True

    def _hf_models(self, names: list[str]) -> dict[str, Any]:
        from shoal.merge.layer_path import load_model

        for name in names:
            if name not in self._hf:
                path = self.spec.models.get(name, name)
                self._hf[name] = load_model(path).to(self.spec.device)
        return {n: self._hf[n] for n in names}

    def build(self, recipe: dict[str, Any], seed: int) -> torch.nn.Module:
        """Build ``recipe`` (in place where possible) and return the model to score.

        A small model builds the recipes M2N2 asks for as one flat vector
        (:mod:`shoal.executors.flat`, the same tensors); everything else goes through
        :func:`~shoal.executors.build.build_candidate`.
        """
        self._built_flat = False
        if self.flat is not None and FlatModel.handles(recipe):
            self._built_flat = self.flat.build(recipe, seed, self._vector) is not None
            if self._built_flat:
                return self.model
        return build_candidate(self.model, recipe, self.sources, seed, hf_models=self._hf_models)

    def _built_tensors(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The last built model's tensors: views of its flat vector when it was built flat
        (the module's state dict, without walking the module), else its state dict."""
        if self.flat is not None and self._built_flat:
            return self.flat.tensors
        return model.state_dict()

    def _vector(self, ref: str) -> FlatVector | None:
        """The flat vector of a source or stored model, or ``None`` (general build).

        Kept for the next time the model is a parent while its tensors are the ones the
        sources hand out (the same objects: a stored model's tensors never change), for
        as many models as fit :data:`VECTOR_CACHE_BYTES`.
        """
        assert self.flat is not None
        try:
            tensors = self.sources[ref]
        except (KeyError, CheckpointError) as exc:
            if isinstance(exc, SourceLoadError):
                raise  # a broken model of the config stops the run, whichever build
            return None  # unknown: the general build names it
        kept = self._vectors.get(ref)
        if kept is not None and kept[0] is tensors:
            self._vectors.move_to_end(ref)
            return kept[1]
        vec = self.flat.vector(tensors)
        if vec is not None and self._vectors_max:
            self._vectors[ref] = (tensors, vec)
            while len(self._vectors) > self._vectors_max:
                self._vectors.popitem(last=False)  # the least recently used
        return vec

    @torch.inference_mode()
    def score(self, model: torch.nn.Module, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Per-example scores of ``model`` on the named tasks."""
        if any(n not in self.tasks for n in names):
            self._build_extra()
        out = {}
        for name in names:
            if name not in self.tasks:
                raise TaskError(f"no task named {name!r}; have {', '.join(self.tasks)}")
            task = self.tasks[name]
            out[name] = check_scores(task, task.score(model))
        return out

    def evaluate(self, item: WorkItem) -> WorkResult:
        """Build and score one item. A failure scores 0 on every example, with its error
        (the runner tells it to the algorithm as NaN)."""
        names = item.tasks if item.tasks is not None else self.fitness_names
        if self.threads is not None:
            self.threads.tick()
        start = time.perf_counter()
        built = start
        fatal = False
        try:
            model = self.build(item.recipe, item.seed)
            built = time.perf_counter()
            with self.threads.scoring() if self.threads is not None else nullcontext():
                scores = self.score(model, names)
            if item.keep_as is not None:
                self.store.put(item.keep_as, self._built_tensors(model))
            error = None
        except Exception as exc:  # a bad candidate must not end the run; it is logged
            scores = {n: np.zeros(len(self.tasks[n])) for n in names if n in self.tasks}
            fatal = isinstance(exc, SourceLoadError)  # ... but a bad source model does
            error = str(exc) if fatal else f"{type(exc).__name__}: {exc}"
            if os.environ.get("SHOAL_DEBUG"):
                traceback.print_exc()
        end = time.perf_counter()
        return WorkResult(
            index=item.index,
            scores=scores,
            seconds=end - start,
            build_seconds=(built if error is None else end) - start,
            worker=self.worker_id,
            error=error,
            fatal=fatal,
        )
