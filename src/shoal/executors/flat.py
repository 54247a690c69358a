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
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from shoal.executors.build import generator_for
from shoal.ops.splitpoint import splitpoint_flat

__all__ = ["MAX_PARAMETERS", "FlatModel", "FlatVector"]

#: largest model (parameters) built as a flat vector; a bigger one takes the general path,
#: whose per-tensor streaming keeps memory at one tensor beyond the model
MAX_PARAMETERS = 50_000_000


class FlatVector:
    """A model as one float32 vector, with the float64 copy its SLERP angles are taken in.

    The copy is made on first use and kept: an M2N2 archive member is a parent of many
    children, and converting both parents for each child cost more than the angles.

    Args:
        f32: The vector, 1-D float32; not to be changed while this object is in use.
    """

    __slots__ = ("_f64", "f32")

    def __init__(self, f32: torch.Tensor) -> None:
        self.f32 = f32
        self._f64: torch.Tensor | None = None

    @property
    def f64(self) -> torch.Tensor:
        """The vector in float64."""
        if self._f64 is None:
            self._f64 = self.f32.to(torch.float64)
        return self._f64


class FlatModel:
    """A module seen as one flat float32 vector, in ``state_dict`` order.

    Build one with :meth:`of`, which says whether the module qualifies.

    Args:
        module: The resident model; :meth:`build` overwrites its parameters in place.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.params = list(module.state_dict(keep_vars=True).items())
        self.names = [n for n, _ in self.params]
        self.shapes = [p.shape for _, p in self.params]
        self.numels = [p.numel() for _, p in self.params]
        self.n = sum(self.numels)
        self._offsets = np.cumsum([0, *self.numels])
        # the parameters become views of one buffer, which a child is built straight into
        self._buffer = torch.empty(self.n, dtype=torch.float32)
        with torch.no_grad():
            for (_, p), part in zip(self.params, self._views(self._buffer), strict=True):
                part.copy_(p)
                p.data = part
        #: the module's tensors: views of the buffer, named as in its state dict
        self.tensors = dict(zip(self.names, self._views(self._buffer), strict=True))
        self._noise = torch.empty(self.n, dtype=torch.float32)  # a mutation's draws
        self._noise_views = self._views(self._noise)
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

    def vector(self, tensors: Mapping[str, torch.Tensor]) -> FlatVector | None:
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
        return FlatVector(torch.cat(parts))

    def _views(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor's part of a flat vector, shaped as the tensor."""
        parts = torch.split(vec, self.numels)
        return [p.view(s) for p, s in zip(parts, self.shapes, strict=True)]

    @staticmethod
    def _normal(seed: int, stream: int, views: Iterable[torch.Tensor]) -> None:
        """N(0, 1) into ``views`` (a vector's tensors), drawn tensor by tensor as the general
        build draws them."""
        gen = generator_for(seed, stream)
        for view in views:
            torch.randn(view.shape, generator=gen, out=view)  # in place, same draws

    def build(
        self,
        recipe: Mapping[str, Any],
        seed: int,
        vector_of: Callable[[str], FlatVector | None],
    ) -> torch.Tensor | None:
        """Build ``recipe``, for the candidate seed ``seed``, into the module's parameters.

        Args:
            recipe: A recipe :meth:`handles`.
            seed: The work item's seed.
            vector_of: Model reference -> its flat vector, or ``None`` (see :meth:`vector`).

        Returns:
            The module's flat vector, now the child's (the buffer its parameters are views
            of: valid until the next build), or ``None``, the module untouched, when a model
            it names is not one :meth:`vector` takes (the general build then builds the
            recipe, or says why it cannot).
        """
        method = recipe.get("merge_method")
        params = recipe.get("parameters") or {}
        out = self._buffer
        if method is None:
            vec = vector_of(str(recipe["model"]))
            if vec is None:
                return None
            out.copy_(vec.f32)
        elif method == "random_init":
            # a seed inside the recipe makes the init part of its content (store keys)
            self._normal(int(params.get("seed", seed)), 1, self.tensors.values())
            out.mul_(float(params.get("std", 0.01)))
        elif not self._splitpoint(recipe, params, vector_of):
            return None
        sigma = float(recipe.get("mutation", 0.0) or 0.0)
        if sigma > 0:
            self._normal(seed, 2, self._noise_views)
            out += self._noise.mul_(sigma)
        return out

    def _splitpoint(
        self,
        recipe: Mapping[str, Any],
        params: Mapping[str, Any],
        vector_of: Callable[[str], FlatVector | None],
    ) -> bool:
        """The split-point child into the buffer; ``False`` (nothing written) when a parent
        is not a vector."""
        a = vector_of(str(recipe["models"][0]["model"]))
        b = vector_of(str(recipe["models"][1]["model"]))
        if a is None or b is None:
            return False
        angle = params.get("angle", "segment")
        splits, ratios = _values(params["split"]), _values(params["ratio"])
        filters = _filters(params["split"])
        chromosomes = self._chromosome_index(filters)
        if chromosomes == [None]:  # its angles from the parents' kept float64 copies
            k = round(splits[0] * self.n)
            f64 = (a.f64, b.f64)
            splitpoint_flat(a.f32, b.f32, k, ratios[0], angle, out=self._buffer, f64=f64)
            return True
        for c, ix in enumerate(chromosomes):
            assert ix is not None
            k = round(splits[c] * ix.numel())
            self._buffer[ix] = splitpoint_flat(a.f32[ix], b.f32[ix], k, ratios[c], angle)
        return True

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
