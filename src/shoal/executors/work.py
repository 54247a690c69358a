"""What travels between the run loop and a worker: plain, picklable data.

A :class:`WorkItem` is a recipe plus the seed of its candidate (derived from the run's root
seed, the batch and the position in it, so every executor builds the same model); a
:class:`WorkResult` carries the per-example scores back. Weights never travel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["WorkItem", "WorkResult", "WorkerSpec", "candidate_seed"]


def candidate_seed(root_seed: int, generation: int, index: int) -> int:
    """Seed of candidate ``index`` of batch ``generation``: ``SeedSequence([root, gen, index])``.

    Returns:
        A non-negative 63-bit integer, the same wherever it is computed.
    """
    state = np.random.SeedSequence([root_seed, generation, index]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


@dataclass(frozen=True)
class WorkItem:
    """One candidate to build and score.

    Attributes:
        index: Evaluation index within the run (0-based, unique).
        recipe: The recipe (plain dict). Besides merge recipes a worker knows
            ``{"model": ref}`` (a source or ``store:<key>`` model as is),
            ``{"merge_method": "random_init", "parameters": {"std": s, "seed": k}}``
            (``seed`` optional, default the item's) and an optional top-level
            ``mutation: sigma`` (Gaussian noise added after building).
        seed: The candidate's seed (:func:`candidate_seed`).
        keep_as: Store key to save the built model under, or ``None``.
        tasks: Names of the tasks to score; ``None`` means every fitness task.
    """

    index: int
    recipe: dict[str, Any]
    seed: int
    keep_as: str | None = None
    tasks: tuple[str, ...] | None = None


@dataclass
class WorkResult:
    """Scores of one :class:`WorkItem`.

    Attributes:
        index: The item's index.
        scores: Task name -> per-example scores, float64 in [0, 1] (zeros when it failed).
        seconds: Wall seconds spent building and scoring.
        build_seconds: Of which building the model.
        worker: Id of the worker (``host:pid`` or actor id).
        error: ``None``, or the reason the candidate failed (it then scores 0 everywhere).
        fatal: The failure is the run's, not the candidate's (a source model named in
            the config cannot be loaded); the run stops with ``error``.
    """

    index: int
    scores: dict[str, np.ndarray]
    seconds: float
    build_seconds: float
    worker: str
    error: str | None = None
    fatal: bool = False


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to set itself up; picklable plain data.

    Attributes:
        loader: The loader block (see :class:`shoal.search.config.LoaderConfig`), as a dict.
        models: Model name -> path.
        base_model: Name of the base model, or ``None``.
        tasks: Fitness task specs (dicts with ``type``).
        extra_tasks: Further task specs (test split), built on first use.
        store: ``{"kind": "memory"|"dir", "path": str|None}``.
        device: Torch device of the resident model.
        root: Directory relative paths in task specs resolve against.
        threads: Torch intra-op threads (``None``: leave as is).
    """

    loader: dict[str, Any]
    models: dict[str, str]
    base_model: str | None
    tasks: list[dict[str, Any]]
    extra_tasks: list[dict[str, Any]] = field(default_factory=list)
    store: dict[str, Any] = field(default_factory=lambda: {"kind": "memory", "path": None})
    device: str = "cpu"
    root: str | None = None
    threads: int | None = None
