"""The flat-vector build of small models: a worker's fast path, chosen automatically.

For a model of a few ten-thousand parameters (the digits MLP of M2N2's image
experiment) the general build (:func:`~shoal.executors.build.build_candidate`: a
pydantic recipe, a merge plan, a split-point pre-pass over every tensor) costs more
than scoring the candidate. When every tensor of the resident model is a float32
parameter and there are at most :data:`MAX_PARAMETERS` of them, the worker sees the
model as one 1-D vector (its ``state_dict`` order, the order every source and stored
model is kept in) and builds the recipes M2N2 asks for directly on vectors:

- ``{"model": ref}``: the reference's vector;
- ``random_init``: N(0, std²) drawn tensor by tensor from ``generator_for(seed, 1)``;
- ``splitpoint``: :func:`~shoal.ops.splitpoint.splitpoint_flat` per chromosome;
- a top-level ``mutation: σ``: N(0, σ²) drawn tensor by tensor from ``generator_for(seed, 2)``.

These are the general build's semantics and random streams (the tests compare both
paths tensor for tensor), so a run is the same whichever path built it. Any other recipe
(PS's merges, DFS's layer paths) goes the general way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from shoal.executors.build import generator_for
from shoal.ops.splitpoint import splitpoint_flat

__all__ = ["MAX_PARAMETERS", "FlatModel"]

#: largest model (parameters) built as a flat vector; a bigger one takes the general path,
#: whose per-tensor streaming keeps memory at one tensor beyond the model
MAX_PARAMETERS = 50_000_000


class FlatModel:
    """A module seen as one flat float32 vector, in ``state_dict`` order.

    Build one with :meth:`of`, which says whether the module qualifies.

    Args:
        module: The resident model; :meth:`load` overwrites its parameters in place.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.params = list(module.state_dict(keep_vars=True).items())
        self.names = [n for n, _ in self.params]
        self.shapes = [p.shape for _, p in self.params]
        self.numels = [p.numel() for _, p in self.params]
        self.n = sum(self.numels)
        self._offsets = np.cumsum([0, *self.numels])
        # the parameters become views of one buffer, so that loading a child is one copy
        self._buffer = torch.empty(self.n, dtype=torch.float32)
        with torch.no_grad():
            for (_, p), part in zip(
                self.params, torch.split(self._buffer, self.numels), strict=True
            ):
                part.view(p.shape).copy_(p)
                p.data = part.view(p.shape)
        self._chromosomes: dict[tuple[str, ...], list[torch.Tensor | None]] = {}

    @classmethod
    def of(cls, module: nn.Module) -> FlatModel | None:
        """A flat view of ``module`` if it qualifies, else ``None``.

        It qualifies when its state dict is its parameters (no buffers, no tied names),
        all float32 on the CPU, at most :data:`MAX_PARAMETERS` in all.
        """
        state = module.state_dict(keep_vars=True)
        params = dict(module.named_parameters(remove_duplicate=False))
        if not state or list(state) != list(params):
            return None
        if len({p.data_ptr() for p in params.values()}) != len(params):
            return None  # tied weights: one tensor under two names
        if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params.values()):
            return None
        if sum(p.numel() for p in params.values()) > MAX_PARAMETERS:
            return None
        return cls(module)

    @staticmethod
    def handles(recipe: Mapping[str, Any]) -> bool:
        """Whether ``recipe`` has one of the plain shapes M2N2 asks for.

        Anything else — other methods, extra keys, values out of range, even a recipe the
        general build refuses — takes the general build and so gets its result or its
        error message.
        """
        keys = set(recipe)
        if "mutation" in keys and not _real(recipe["mutation"], 0.0, math.inf):
            return False
        method = recipe.get("merge_method")
        if method is None:
            return keys <= {"model", "mutation"} and isinstance(recipe.get("model"), str)
        params = recipe.get("parameters", {})
        if not isinstance(params, Mapping) or keys - {
            "merge_method",
            "parameters",
            "mutation",
            "models",
        }:
            return False
        if method == "random_init":
            seed = params.get("seed", 0)
            return (
                "models" not in keys
                and set(params) <= {"std", "seed", "member"}
                and _real(params.get("std", 0.01), 0.0, math.inf)
                and isinstance(seed, int)
                and not isinstance(seed, bool)
                and seed >= 0
            )
        models = recipe.get("models")
        if method != "splitpoint" or not isinstance(models, list) or len(models) != 2:
            return False
        if not all(isinstance(m, Mapping) and set(m) == {"model"} for m in models):
            return False
        if not all(isinstance(m["model"], str) for m in models):
            return False
        if set(params) - {"split", "ratio", "angle"}:
            return False
        if params.get("angle", "segment") not in ("segment", "global"):
            return False
        split, ratio = params.get("split"), params.get("ratio")
        if _real(split, 0.0, 1.0) and _real(ratio, 0.0, 1.0):
            return True
        return (
            _chromosome_list(split)
            and _chromosome_list(ratio)
            and _filters(split) == _filters(ratio)
        )

    def vector(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """A source's or stored model's tensors as one float32 vector in the module's order.

        ``None`` unless the tensors are exactly the module's, float32 and of its shapes:
        the general build then merges them (rounding to their dtype as it does) or says
        what does not fit.
        """
        if len(tensors) != len(self.names):
            return None
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            part = tensors.get(name)
            if part is None or part.dtype != torch.float32 or part.shape != shape:
                return None
            parts.append(part.reshape(-1))
        return torch.cat(parts)

    def load(self, vec: torch.Tensor) -> None:
        """Copy a flat vector into the resident module, in place."""
        self._buffer.copy_(vec)

    def normal(self, std: float, seed: int, stream: int) -> torch.Tensor:
        """N(0, std²) for every tensor, drawn tensor by tensor as the general build draws it."""
        gen = generator_for(seed, stream)
        out = torch.empty(self.n, dtype=torch.float32)
        for part, shape in zip(torch.split(out, self.numels), self.shapes, strict=True):
            torch.randn(shape, generator=gen, out=part.view(shape))  # in place, same draws
        return out.mul_(std)

    def tensors(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat vector as the module's state dict: views of ``vec``, in module order."""
        parts = torch.split(vec, self.numels)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def build(
        self,
        recipe: Mapping[str, Any],
        seed: int,
        vector_of: Callable[[str], torch.Tensor | None],
    ) -> torch.Tensor | None:
        """The flat vector ``recipe`` describes, for the candidate seed ``seed``.

        Args:
            recipe: A recipe :meth:`handles`.
            seed: The work item's seed.
            vector_of: Model reference -> its flat vector, or ``None`` (see :meth:`vector`).

        Returns:
            The vector, or ``None`` when a model it names is not one :meth:`vector` takes
            (the general build then builds the recipe, or says why it cannot).
        """
        method = recipe.get("merge_method")
        params = recipe.get("parameters") or {}
        vec: torch.Tensor | None
        if method is None:
            vec = vector_of(str(recipe["model"]))
            vec = None if vec is None else vec.clone()
        elif method == "random_init":
            # a seed inside the recipe makes the init part of its content (store keys)
            vec = self.normal(float(params.get("std", 0.01)), int(params.get("seed", seed)), 1)
        else:
            vec = self._splitpoint(recipe, params, vector_of)
        if vec is None:
            return None
        sigma = float(recipe.get("mutation", 0.0) or 0.0)
        if sigma > 0:
            vec += self.normal(sigma, seed, 2)
        return vec

    def _splitpoint(
        self,
        recipe: Mapping[str, Any],
        params: Mapping[str, Any],
        vector_of: Callable[[str], torch.Tensor | None],
    ) -> torch.Tensor | None:
        a = vector_of(str(recipe["models"][0]["model"]))
        b = vector_of(str(recipe["models"][1]["model"]))
        if a is None or b is None:
            return None
        angle = params.get("angle", "segment")
        splits, ratios = _values(params["split"]), _values(params["ratio"])
        filters = _filters(params["split"])
        chromosomes = self._chromosome_index(filters)
        if chromosomes == [None]:
            return splitpoint_flat(a, b, round(splits[0] * self.n), ratios[0], angle)
        child = torch.empty_like(a)
        for c, ix in enumerate(chromosomes):
            assert ix is not None
            k = round(splits[c] * ix.numel())
            child[ix] = splitpoint_flat(a[ix], b[ix], k, ratios[c], angle)
        return child

    def _chromosome_index(self, filters: tuple[str, ...]) -> list[torch.Tensor | None]:
        """Index tensors of each chromosome: a tensor belongs to the entry a recipe's filter
        list gives it (:func:`~shoal.recipe.params.filter_entry`, as the general build)."""
        if filters not in self._chromosomes:
            if len(filters) <= 1:
                self._chromosomes[filters] = [None]
            else:
                from shoal.recipe.params import filter_entry

                entries: list[Mapping[str, Any]] = [{"filter": f} if f else {} for f in filters]
                groups: list[list[int]] = [[] for _ in filters]
                for i, name in enumerate(self.names):
                    c = filter_entry(entries, name)
                    assert c is not None  # handles(): the last entry has no filter
                    groups[c].extend(range(int(self._offsets[i]), int(self._offsets[i + 1])))
                self._chromosomes[filters] = [torch.as_tensor(g, dtype=torch.long) for g in groups]
        return self._chromosomes[filters]


def _values(value: Any) -> list[float]:
    """A scalar or a per-chromosome ``{filter, value}`` list → floats in chromosome order."""
    if isinstance(value, list):
        return [float(e["value"]) for e in value]
    return [float(value)]


def _real(value: Any, low: float, high: float) -> bool:
    """A real number (not a bool) in [low, high] (NaN is not)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and low <= value <= high


def _chromosome_list(value: Any) -> bool:
    """A per-chromosome list as M2N2 writes it: ``{filter: str, value}`` entries with
    values in [0, 1], the last one without a filter (the rest of the tensors)."""
    if not isinstance(value, list) or not value:
        return False
    if not all(isinstance(e, Mapping) and _real(e.get("value"), 0.0, 1.0) for e in value):
        return False
    *named, rest = value
    return set(rest) == {"value"} and all(
        set(e) == {"filter", "value"} and isinstance(e["filter"], str) and e["filter"]
        for e in named
    )


def _filters(value: Any) -> tuple[str, ...]:
    """The chromosome filters of a ``{filter, value}`` list (the last entry, unfiltered, is '')."""
    if not isinstance(value, list):
        return ()
    return tuple(str(e.get("filter", "")) for e in value)
