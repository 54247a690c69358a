"""Evolutionary model merge in data-flow space (Akiba et al., 2024; METHODS.md §2, "DFS").

Every layer keeps its weights; what evolves is the path a token takes. The M
layers of the source models are laid out in order (A's, then B's, ...) and the
sequence is repeated r times, giving slots t = 0 … M·r − 1. An indicator I_t > 0
keeps slot t; the path is the kept slots in order. Model A's first and last layers
are pinned: they start and end every path and are left out of the indicator (so
the initial genome is exactly model A). Each hop from layer i to layer j scales
the hidden state entering j by W_ij, W ∈ ℝ^{M×M} (``scaling: matrix``, the paper's
form), or by one number per slot (``scaling: slot``), or not at all (``none``).

Initialisation (METHODS.md §2): I = 0 except A's layers in the first repetition at
2σ0, W = 1; CMA-ES with population 128 by default. Embeddings, final norm, head and
tokenizer come from model A. That start, model A, is scored once before the first
generation without being told to CMA-ES (:attr:`GenomeCMAES.start`), so the best is never
below model A: a DFS stage after PS keeps PS's result unless a path beats it.

Candidates are ``layer_path`` recipes (validated and built by
:mod:`shoal.merge.layer_path`)::

    merge_method: layer_path
    models: [{model: A}, {model: B}]
    parameters:
      path: [[A, 0], [A, 1], [B, 1], [A, 2]]
      scales: [1.0, 1.0, 0.93, 1.1]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import Field

from shoal.errors import RecipeError
from shoal.search.algorithms.base import AlgorithmOptions, SearchContext, register, validate_options
from shoal.search.algorithms.cmaes import CMAES, GenomeCMAES

__all__ = ["DFS", "DFSOptions"]


class DFSOptions(AlgorithmOptions):
    """Options of ``algorithm: dfs`` (unknown keys are an error)."""

    models: list[str] | None = Field(
        None, description="models whose layers are laid out, A first (default: the context's)"
    )
    repeats: int = Field(3, ge=1, description="r: times the layer sequence is repeated")
    scaling: Literal["matrix", "slot", "none"] = Field(
        "matrix", description="input scale per hop i→j (M×M matrix), per slot, or none"
    )
    sigma0: float = Field(1.0, gt=0, description="CMA-ES step size of the indicators")
    scale_sigma: float = Field(0.1, gt=0, description="initial step size of the scales")
    popsize: int | None = Field(128, ge=2, description="CMA-ES population")
    cma_options: dict[str, Any] = Field(default_factory=dict, description="further pycma options")


@register
class DFS(GenomeCMAES):
    """CMA-ES over a layer-path indicator and hop scales (data-flow-space merge).

    Args:
        models: Model names in layout order; the first (A) gives embeddings and head.
        num_layers: Number of layers of each model, same order.
        seed: Root seed.
        options: :class:`DFSOptions` (or a dict of them).
    """

    name = "dfs"
    tensorwise = False  # layers of other models; embeddings and head from model A
    Options = DFSOptions

    def __init__(
        self,
        models: list[str],
        num_layers: list[int],
        *,
        seed: int = 0,
        options: DFSOptions | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.options = _options(options)
        opts = self.options
        if len(models) != len(num_layers) or not models:
            raise RecipeError("dfs: need one layer count per model and at least one model")
        if num_layers[0] < 2:
            raise RecipeError(f"dfs: model {models[0]!r} needs ≥ 2 layers (first and last pinned)")
        self.models = list(models)
        self.num_layers = [int(n) for n in num_layers]
        # the M layers in layout order, as (model, layer)
        self.layers: list[tuple[str, int]] = [
            (m, i) for m, n in zip(self.models, self.num_layers, strict=True) for i in range(n)
        ]
        a, last = self.models[0], self.num_layers[0] - 1
        self.pinned = {(a, 0), (a, last)}
        # free slots: (repetition, global layer index), layout order, pinned layers left out
        self.slots = [
            (rep, j)
            for rep in range(opts.repeats)
            for j, lay in enumerate(self.layers)
            if lay not in self.pinned
        ]
        m, t = len(self.layers), len(self.slots)
        n_scales = {"matrix": m * m, "slot": t + 1, "none": 0}[opts.scaling]
        x0 = np.zeros(t + n_scales)
        for s, (rep, j) in enumerate(self.slots):
            if rep == 0 and self.layers[j][0] == a:
                x0[s] = 2.0 * opts.sigma0  # A's layers of the first repetition are on
        x0[t:] = 1.0
        self.start = x0.copy()  # model A itself: scored first, so DFS never ends below it
        stds = [1.0] * t + [opts.scale_sigma / opts.sigma0] * n_scales
        self.es = CMAES(
            x0,
            opts.sigma0,
            seed=seed,
            popsize=opts.popsize,
            stds=stds,
            options=opts.cma_options,
        )

    @classmethod
    def from_config(cls, options: Mapping[str, Any], context: SearchContext) -> DFS:
        """Build from a config's ``options`` and the run's search context.

        Uses ``context.models`` (names in order; ``options.models`` overrides, A first),
        ``context.num_layers`` (mapping model name to layer count) and ``context.seed``.
        """
        opts = _options(options)
        names = list(opts.models) if opts.models else list(context.models)
        if not opts.models and context.base_model in names and len(names) > 2:
            names.remove(context.base_model)  # a base model only matters to PS
        layers = [context.num_layers.get(n) for n in names]
        for n, count in zip(names, layers, strict=True):
            if count is None:
                raise RecipeError(f"algorithm.models: number of layers unknown for model {n!r}")
        return cls(names, [int(c or 0) for c in layers], seed=context.seed, options=opts)

    # -- genome <-> recipe --------------------------------------------------------------------
    def path_and_scales(self, x: np.ndarray) -> tuple[list[tuple[str, int]], list[float]]:
        """Decode a genome into the layer path and each path entry's input scale.

        The first entry's input comes from the embeddings and has scale 1.
        """
        x = np.asarray(x, dtype=np.float64)
        t = len(self.slots)
        a, last = self.models[0], self.num_layers[0] - 1
        index = {lay: j for j, lay in enumerate(self.layers)}
        kept = [s for s in range(t) if x[s] > 0]  # I_t > 0 keeps slot t
        path = [(a, 0)] + [self.layers[self.slots[s][1]] for s in kept] + [(a, last)]
        scaling = self.options.scaling
        if scaling == "matrix":
            m = len(self.layers)
            w = x[t:].reshape(m, m)
            scales = [1.0] + [
                float(w[index[path[h - 1]], index[path[h]]]) for h in range(1, len(path))
            ]
        elif scaling == "slot":
            s = x[t:]
            scales = [1.0] + [float(s[k]) for k in kept] + [float(s[t])]
        else:
            scales = [1.0] * len(path)
        return path, scales

    def decode(self, x: np.ndarray) -> dict[str, Any]:
        """The ``layer_path`` recipe of a genome vector."""
        path, scales = self.path_and_scales(x)
        return {
            "merge_method": "layer_path",
            "models": [{"model": m} for m in self.models],
            "parameters": {"path": [[m, i] for m, i in path], "scales": scales},
        }

    def describe(self, x: np.ndarray) -> dict[str, Any]:
        """Path length and the kept slots, for reports."""
        path, scales = self.path_and_scales(x)
        return {
            "length": len(path),
            "path": [f"{m}:{i}" for m, i in path],
            "scales": scales,
        }


def _options(options: DFSOptions | Mapping[str, Any] | None) -> DFSOptions:
    if isinstance(options, DFSOptions):
        return options
    return validate_options(DFSOptions, options or {}, "algorithm")  # type: ignore[no-any-return]
