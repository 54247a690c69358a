"""Fast path for M2N2 on small torch models: the archive as flat parameter vectors in memory.

The generic path sends each recipe through the runner, a store and an executor. For
a model of a few ten-thousand parameters (the digits MLP) that machinery costs more
than the evaluation itself, so :class:`FlatM2N2` drives the *same*
:class:`~shoal.search.m2n2.M2N2` state machine — the same ask/tell, selection and
replacement code — and interprets its recipes directly: every stored model is one
1-D float32 tensor (the module's parameters in ``named_parameters`` order), a child
is built with :func:`shoal.ops.splitpoint.splitpoint_flat`, copied into the one
resident module and scored. With ``batch_size = k > 1`` (the algorithm's batched
variant) the k children are scored in one vectorised forward pass (``torch.func.vmap``).

Recipe semantics are the executors' (:func:`shoal.executors.build.build_candidate`),
with the same random streams: candidate ``i`` of round ``g`` gets the seed
``candidate_seed(root, g, i)``; ``random_init`` draws N(0, std²) parameter by
parameter from ``generator_for(seed, 1)``, ``mutation: σ`` adds N(0, σ²) drawn from
``generator_for(seed, 2)``; ``splitpoint`` splits each chromosome's flat vector at
index round(split·n).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shoal._atomic import atomic_path, write_text_atomic
from shoal.errors import StateError
from shoal.executors.build import generator_for
from shoal.executors.work import candidate_seed
from shoal.ops.splitpoint import splitpoint_flat
from shoal.search.base import STORE_PREFIX, store_key
from shoal.search.m2n2 import M2N2, coverage, mean_entropy


class FlatModel:
    """A module seen as one flat parameter vector (``named_parameters`` order).

    Args:
        module: the resident model; its parameters are overwritten by :meth:`load`.
        chromosomes: tensor-name substrings (a final ``''`` for the rest is added when
            missing); a tensor belongs to the first chromosome whose substring it contains.
    """

    def __init__(self, module: nn.Module, chromosomes: list[str] | None = None) -> None:
        self.module = module
        self.params = dict(module.named_parameters())
        self.names = list(self.params)
        self.shapes = [p.shape for p in self.params.values()]
        self.numels = [p.numel() for p in self.params.values()]
        self.n = sum(self.numels)
        filters = list(chromosomes or [])
        if not filters or filters[-1] != "":
            filters.append("")  # the rest, as M2N2Options.chromosome_filters has it
        self.filters = filters
        offsets = np.cumsum([0, *self.numels])
        groups: list[list[int]] = [[] for _ in filters]
        for i, name in enumerate(self.names):
            c = next((k for k, f in enumerate(filters) if f in name), None)
            if c is None:
                raise StateError(f"tensor {name!r} matches no chromosome in {filters}")
            groups[c].extend(range(int(offsets[i]), int(offsets[i + 1])))
        # index tensors of each chromosome (None: the whole vector, no gather needed)
        self.chromosomes: list[torch.Tensor | None] = (
            [None] if len(filters) == 1 else [torch.as_tensor(g, dtype=torch.long) for g in groups]
        )

    def flatten(self, module: nn.Module | None = None) -> torch.Tensor:
        """The flat float32 vector of ``module`` (default: the resident one)."""
        m = module or self.module
        return torch.cat([p.detach().reshape(-1).float() for p in m.parameters()])

    def load(self, vec: torch.Tensor) -> None:
        """Copy a flat vector into the resident module, in place."""
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(vec, self.module.parameters())

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat vector shaped as the module's parameters."""
        parts = torch.split(vec, self.numels)
        return {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes, strict=True)}

    def normal(self, std: float, seed: int, stream: int) -> torch.Tensor:
        """N(0, std²) for every parameter, drawn tensor by tensor as the executors draw it."""
        gen = generator_for(seed, stream)
        return torch.cat([torch.randn(s, generator=gen).reshape(-1) * std for s in self.shapes])

    def forward_many(self, vecs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits of k models given as rows of ``vecs`` (k, n) on inputs ``x``: (k, N, classes)."""

        def one(v: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.module, self.unflatten(v), (x,))

        with torch.no_grad():
            return torch.func.vmap(one)(vecs)


@dataclass
class FlatM2N2:
    """Run an :class:`M2N2` algorithm with its archive held as flat vectors in memory.

    Args:
        algo: the algorithm (its options decide everything about the search).
        model: the resident model as a :class:`FlatModel`.
        tasks: fitness tasks by name; each needs ``score(module)``, and for the batched
            forward also ``x`` and ``correct(logits)`` (``ClassificationTask`` has both).
        sources: flat vectors of the seed models by name (``init: seeds``).
    """

    algo: M2N2
    model: FlatModel
    tasks: Mapping[str, Any]
    sources: dict[str, torch.Tensor] = field(default_factory=dict)
    store: dict[str, torch.Tensor] = field(default_factory=dict)
    generation: int = 0  # ask/tell rounds so far (names the candidates' random streams)

    def __post_init__(self) -> None:
        wanted = self.algo.options.chromosome_filters
        if self.model.filters != wanted:
            raise StateError(
                f"m2n2: the algorithm's chromosomes {wanted} differ from the FlatModel's "
                f"{self.model.filters}; build both from the same `chromosomes`"
            )

    def vector(self, ref: str) -> torch.Tensor:
        """The flat vector of a seed name or ``store:<hash>`` reference."""
        if ref.startswith(STORE_PREFIX):
            return self.store[ref[len(STORE_PREFIX) :]]
        if ref not in self.sources:
            raise StateError(f"m2n2: recipe references unknown model {ref!r}")
        return self.sources[ref]

    def build(self, recipe: dict[str, Any], seed: int = 0) -> torch.Tensor:
        """The flat vector a recipe describes, with candidate seed ``seed``."""
        method = recipe.get("merge_method")
        params = recipe.get("parameters", {})
        if method is None:
            return self.vector(recipe["model"])
        if method == "random_init":
            return self.model.normal(float(params.get("std", 0.01)), seed, 1)
        if method != "splitpoint":
            raise StateError(f"m2n2 flat path cannot build merge_method {method!r}")
        a = self.vector(recipe["models"][0]["model"])
        b = self.vector(recipe["models"][1]["model"])
        splits, ratios = _values(params["split"]), _values(params["ratio"])
        if len(self.model.chromosomes) == 1:
            idx = round(splits[0] * self.model.n)
            child = splitpoint_flat(a, b, idx, ratios[0], params.get("angle", "segment"))
        else:
            child = torch.empty_like(a)
            for c, ix in enumerate(self.model.chromosomes):
                assert ix is not None
                k = round(splits[c] * ix.numel())
                child[ix] = splitpoint_flat(a[ix], b[ix], k, ratios[c], params["angle"])
        sigma = float(recipe.get("mutation", 0.0) or 0.0)
        if sigma > 0:
            child += self.model.normal(sigma, seed, 2)
        return child

    def score(self, vecs: list[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        """Per-example scores of each vector on every fitness task."""
        if len(vecs) > 1 and all(hasattr(t, "correct") for t in self.tasks.values()):
            stacked = torch.stack(vecs)
            per_task = {
                name: t.correct(self.model.forward_many(stacked, t.x)).numpy().astype(np.float64)
                for name, t in self.tasks.items()
            }
            return [{name: s[i] for name, s in per_task.items()} for i in range(len(vecs))]
        out = []
        for v in vecs:
            self.model.load(v)
            out.append({name: t.score(self.model.module) for name, t in self.tasks.items()})
        return out

    def step(self, n: int | None = None) -> int:
        """One ask → build → score → tell round; returns the number of evaluations."""
        recipes = self.algo.ask(n)
        root, g = self.algo.options.seed, self.generation
        vecs = [self.build(r, candidate_seed(root, g, i)) for i, r in enumerate(recipes)]
        scores = self.score(vecs)
        self.algo.tell(recipes, scores)
        self.generation += 1
        for r, v in zip(recipes, vecs, strict=True):
            if "merge_method" in r:
                self.store[store_key(r)] = v
        keep = self.algo.references()
        for key in [k for k in self.store if k not in keep]:
            del self.store[key]
        return len(recipes)

    def best_vector(self) -> torch.Tensor:
        """Flat vector of the archive member with the best training score."""
        best = self.algo.best
        if best is None:
            raise StateError("m2n2: no member evaluated yet")
        return self.vector(best.extra["ref"])

    def run(
        self,
        evaluations: int,
        *,
        callback: Callable[[FlatM2N2], None] | None = None,
        every: int = 1000,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        """Step until ``evaluations`` in total; ``callback(self)`` every ``every`` evaluations."""
        next_cb = (self.algo.evaluations // every + 1) * every
        while self.algo.evaluations < evaluations:
            left = evaluations - self.algo.evaluations
            self.step(min(self.algo.options.batch_size, left))
            if callback is not None and (
                self.algo.evaluations >= next_cb or self.algo.evaluations >= evaluations
            ):
                callback(self)
                next_cb = (self.algo.evaluations // every + 1) * every
            if stop is not None and stop():
                break

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Algorithm state plus the stored vectors (the archive's weights)."""
        return {
            "algorithm": self.algo.state_dict(),
            "generation": self.generation,
            "store": dict(self.store),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.algo.load_state_dict(state["algorithm"])
        self.generation = int(state["generation"])
        self.store = {k: v.clone() for k, v in state["store"].items()}
        missing = self.algo.references() - set(self.store)
        if missing:
            raise StateError(f"m2n2: saved store lacks archive member(s) {sorted(missing)[:3]}")

    def save(self, run_dir: Path) -> None:
        """Write ``state.json`` and ``store.safetensors`` into ``run_dir`` atomically."""
        from safetensors.torch import save_file

        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(run_dir / "store.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in self.store.items()}, str(tmp))
        state = {"algorithm": self.algo.state_dict(), "generation": self.generation}
        write_text_atomic(run_dir / "state.json", json.dumps(state, indent=1))

    def load(self, run_dir: Path) -> None:
        """Resume from a folder written by :meth:`save`."""
        from safetensors.torch import load_file

        state = json.loads((run_dir / "state.json").read_text())
        state["store"] = load_file(str(run_dir / "store.safetensors"))
        self.load_state_dict(state)


def _values(value: Any) -> list[float]:
    """A scalar or a per-chromosome filter list → list of floats in chromosome order."""
    if isinstance(value, list):
        return [float(e["value"]) for e in value]
    return [float(value)]


@dataclass
class History:
    """Points of a run's curves, recorded every few evaluations."""

    rows: list[dict[str, float]] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def record(self, runner: FlatM2N2, test_task: Any | None = None) -> dict[str, float]:
        """Append the current best's train/test accuracy and the archive's diversity."""
        best = runner.algo.best
        assert best is not None
        row = {
            "evaluations": float(runner.algo.evaluations),
            "seconds": time.perf_counter() - self.t0,
            "train_accuracy": best.fitness,
            "coverage": coverage(runner.algo.scores),
            "entropy": mean_entropy(runner.algo.scores),
        }
        if test_task is not None:
            runner.model.load(runner.best_vector())
            row["test_accuracy"] = float(test_task.score(runner.model.module).mean())
        self.rows.append(row)
        return row
