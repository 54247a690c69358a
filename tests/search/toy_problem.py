"""A toy problem for the run loop: a 1-parameter "model", a task around it, a random search.

The model is ``Scalar`` (one parameter ``x``). Two source models hold x = 0 and x = 1, so
the linear merge with weights (1 - t, t) has x = t. The task scores example j as
``1 - |x - c_j|`` for five centres c_j, so the best t is their median, 0.5.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from safetensors.torch import save_file

from shoal.search.algorithms.base import (
    ALGORITHMS,
    Algorithm,
    AlgorithmOptions,
    Best,
    SearchContext,
    mean_over_tasks,
    register,
    store_ref,
)
from shoal.search.run_folder import RunFolder

CENTRES = np.array([0.2, 0.35, 0.5, 0.65, 0.8])


class Scalar(torch.nn.Module):
    """A model with one parameter ``x`` of shape (1,)."""

    def __init__(self, value: float = 0.0) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(torch.tensor([value]))


class Tied(torch.nn.Module):
    """Embeddings and an output head sharing one weight, as tied language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.lm_head = torch.nn.Linear(3, 5, bias=False)
        self.lm_head.weight = self.embed.weight


def make_scalar(value: float = 0.0) -> Scalar:
    """Loader target."""
    return Scalar(value)


def score(model: Scalar) -> np.ndarray:
    """Per-example scores 1 - |x - c_j|."""
    x = float(model.x.detach()[0])
    return np.clip(1.0 - np.abs(x - CENTRES), 0.0, 1.0)


def raise_always(model: Scalar) -> np.ndarray:
    """A task that fails on every model (its test split, say, is unreadable)."""
    raise ValueError("this task always fails")


def score_or_raise(model: Scalar) -> np.ndarray:
    """Like :func:`score`, but a model with x > 0.6 is an error (a candidate that fails)."""
    if float(model.x.detach()[0]) > 0.6:
        raise ValueError("x above 0.6")
    return score(model)


def score_or_die(model: Scalar, marker: str) -> np.ndarray:
    """Like :func:`score`, but kills its own process the first time (marker file absent)."""
    path = Path(marker)
    if not path.exists():
        path.write_text("died once")
        os._exit(3)
    return score(model)


def score_noting_pid(model: Scalar, pid_dir: str) -> np.ndarray:
    """Like :func:`score`, slowly, leaving a file named by this process's pid in ``pid_dir``."""
    (Path(pid_dir) / str(os.getpid())).touch()
    time.sleep(0.05)
    return score(model)


def function_fitness(target: str, **options: Any) -> list[dict[str, Any]]:
    """``tasks.fitness``: one function task ``toy`` of 5 examples scored by ``target``."""
    return [{"type": "function", "name": "toy", "target": target, "size": 5, "options": options}]


def dying_fitness(marker: Path) -> list[dict[str, Any]]:
    """``tasks.fitness`` with :func:`score_or_die`: the first worker to score dies."""
    return function_fitness("toy_problem:score_or_die", marker=str(marker))


def interrupting_score(model: Scalar, pid: int, at: float) -> np.ndarray:
    """Like :func:`score`; sends SIGINT to process ``pid`` when x is near ``at``."""
    if abs(float(model.x.detach()[0]) - at) < 1e-6:
        os.kill(pid, signal.SIGINT)
    return score(model)


def interrupting_fitness(at: float) -> list[dict[str, Any]]:
    """``tasks.fitness`` that sends this process SIGINT when a candidate's x is ``at``."""
    return function_fitness("toy_problem:interrupting_score", pid=os.getpid(), at=at)


#: event fields that do not depend on the executor (no timings, no worker names)
EVENT_KEYS = ("evaluation", "recipe", "seed", "means", "fitness", "error")


def run_events(run: Path, keys: tuple[str, ...] = EVENT_KEYS) -> list[dict[str, Any]]:
    """The events of the run folder ``run``, each cut down to ``keys``."""
    return [{k: e[k] for k in keys} for e in RunFolder(run).events.read()]


def write_sources(directory: Path) -> dict[str, str]:
    """Two 1-parameter checkpoints, x = 0 and x = 1."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, value in (("zero", 0.0), ("one", 1.0)):
        path = directory / f"{name}.safetensors"
        save_file({"x": torch.tensor([value])}, str(path))
        out[name] = str(path.resolve())
    return out


class ToyOptions(AlgorithmOptions):
    """Options of the toy random search."""

    population: int = Field(4, ge=1)
    models: int | None = Field(None, description="unused; a name PS gives another meaning")


def linear_recipe(t: float) -> dict[str, Any]:
    """Linear merge of zero and one with x = t."""
    return {
        "merge_method": "linear",
        "models": [
            {"model": "zero", "parameters": {"weight": 1.0 - t}},
            {"model": "one", "parameters": {"weight": t}},
        ],
    }


class ToyRandomSearch(Algorithm):
    """Random search over t in [0, 1]; keeps its best. Deterministic by seed."""

    name = "toy-random"
    Options = ToyOptions
    keep_models: ClassVar[bool] = False

    def __init__(self, options: ToyOptions, context: SearchContext) -> None:
        super().__init__()
        self.options = options
        self.rng = np.random.default_rng(np.random.SeedSequence(context.seed))
        self._best: Best | None = None
        self.model_names = sorted(context.models)

    def _ask(self, n: int | None) -> list[dict[str, Any]]:
        k = n or self.options.population
        return [linear_recipe(round(float(t), 6)) for t in self.rng.uniform(0.0, 1.0, size=k)]

    def _tell(self, recipes: list[dict[str, Any]], scores: list[Any]) -> None:
        for i, (r, s) in enumerate(zip(recipes, scores, strict=True)):
            f = mean_over_tasks(s)
            if math.isfinite(f) and (self._best is None or f > self._best.fitness):
                self._best = Best(r, f, self.evaluations + i)

    @property
    def best(self) -> Best | None:
        return self._best

    def _state(self) -> dict[str, Any]:
        b = self._best
        return {
            "rng": self.rng.bit_generator.state,
            "models": self.model_names,
            "best": None if b is None else [b.recipe, b.fitness, b.evaluation],
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        b = state["best"]
        self._best = None if b is None else Best(b[0], b[1], b[2])


class ToyKeeper(ToyRandomSearch):
    """Like the random search, but every other batch merges the best kept model with one.

    Exercises the model store: recipes refer to ``store:<key>`` of earlier candidates.
    """

    name = "toy-keeper"
    keep_models: ClassVar[bool] = True

    def _ask(self, n: int | None) -> list[dict[str, Any]]:
        recipes = super()._ask(n)
        if self._best is None or self.evaluations // (n or self.options.population) % 2 == 0:
            return recipes
        ref = store_ref(self._best.recipe)
        return [
            {
                "merge_method": "linear",
                "models": [
                    {"model": ref, "parameters": {"weight": 0.9}},
                    {"model": "one", "parameters": {"weight": round(0.1 * i / len(recipes), 6)}},
                ],
            }
            for i in range(len(recipes))
        ]

    def references(self) -> set[str]:
        return set() if self._best is None else {store_ref(self._best.recipe)}


for _cls in (ToyRandomSearch, ToyKeeper):
    if _cls.name not in ALGORITHMS:
        register(_cls)


def toy_config(sources: dict[str, str], **overrides: Any) -> dict[str, Any]:
    """A config for the toy problem."""
    cfg: dict[str, Any] = {
        "models": sources,
        "loader": {"type": "callable", "target": "toy_problem:make_scalar"},
        "tasks": {
            "fitness": [
                {"type": "function", "name": "toy", "target": "toy_problem:score", "size": 5}
            ],
            "test": [
                {"type": "function", "name": "toy-test", "target": "toy_problem:score", "size": 5}
            ],
        },
        "algorithm": {"name": "toy-random", "population": 4},
        "budget": {"evaluations": 12},
        "seed": 7,
        "progress": False,
    }
    cfg.update(overrides)
    return cfg
