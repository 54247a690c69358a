"""Evolutionary model merge in parameter space (Akiba et al., 2024; METHODS.md §2, "PS").

Genome: for each source model k and each layer group g, a weight w_{k,g} and a
density d_{k,g} ∈ [0, 1] of a DARE-TIES merge of the task vectors τ_k = θ_k − θ_base
(``method`` may name another merge method: the genome is then whichever of the two
per-model parameters it reads — the weight alone for task_arithmetic, multislerp, nuslerp).
Groups are ``per_model`` (one group a model: the published 7B setting, two numbers
a model) or ``per_layer`` (the input embeddings, each transformer block, and one
group for everything else: final norm and head). CMA-ES searches the genome with
x0 = 0.5, σ0 = 1/6, population 4 + ⌊3 ln n⌋; weights are *not* forced to sum to 1.

Candidates are mergekit-style recipe dicts, e.g. for ``per_model``::

    merge_method: dare_ties
    base_model: base
    models:
      - {model: expert-a, parameters: {weight: 0.61, density: 0.43}}
      - {model: expert-b, parameters: {weight: 0.52, density: 0.57}}

``per_layer`` groups become filter lists (first matching substring wins, a
filter-less entry is the default): ``weight: [{filter: embed, value: ..},
{filter: "layers.0.", value: ..}, ..., {value: ..}]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from shoal.errors import RecipeError
from shoal.search.algorithms.base import AlgorithmOptions, SearchContext, register, validate_options
from shoal.search.algorithms.cmaes import CMAES, GenomeCMAES

__all__ = ["PS", "PSOptions"]

# the recipe parameters each model's genome entries can become
GENOME_KEYS = ("weight", "density")


def genome_keys(method: str) -> tuple[str, ...]:
    """The per-model parameters of ``GENOME_KEYS`` that ``method`` reads, in that order
    (empty when the method is unknown, takes no base, or reads neither)."""
    from shoal.recipe import METHODS

    spec = METHODS.get(method)
    if spec is None or not (spec.needs_base or spec.optional_base):
        return ()
    return tuple(k for k in GENOME_KEYS if (p := spec.param(k)) is not None and p.per_model)


class PSOptions(AlgorithmOptions):
    """Options of ``algorithm: ps`` (unknown keys are an error)."""

    models: list[str] | None = Field(
        None, description="source models to merge (default: every model but the base)"
    )
    groups: Literal["per_model", "per_layer"] = Field(
        "per_model", description="one (weight, density) pair per model, or per layer group"
    )
    method: str = Field(
        "dare_ties",
        description="merge method the genome parameterises: any registered method with a "
        "base and a per-model weight or density (dare_ties, ties, dare_linear, della, "
        "della_linear, breadcrumbs, breadcrumbs_ties, task_arithmetic, multislerp, nuslerp)",
    )
    x0: float = Field(0.5, description="initial value of every genome entry")
    sigma0: float = Field(1.0 / 6.0, gt=0, description="initial CMA-ES step size")
    popsize: int | None = Field(None, ge=2, description="CMA-ES population (4 + ⌊3 ln n⌋)")
    weight_range: tuple[float, float] = Field((0.0, 1.0), description="bounds of each weight")
    density_range: tuple[float, float] = Field((0.0, 1.0), description="bounds of each density")
    layer_filter: str = Field(
        "layers.{i}.", description="per_layer: substring naming block i's tensors"
    )
    embed_filter: str = Field("embed", description="per_layer: substring naming the embeddings")
    num_layers: int | None = Field(
        None, ge=1, description="per_layer: number of blocks (default: from the context)"
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="extra global recipe parameters (e.g. rescale)"
    )
    dtype: str | None = Field(None, description="recipe dtype (default: the merge's default)")
    cma_options: dict[str, Any] = Field(default_factory=dict, description="further pycma options")

    @field_validator("method")
    @classmethod
    def _method_takes_the_genome(cls, value: str) -> str:
        """The method must be registered, take a base and read a per-model weight or density."""
        from shoal.recipe import METHODS

        fits = [name for name in METHODS if genome_keys(name)]
        if value not in fits:
            why = (
                "is no merge method"
                if value not in METHODS
                else "has no base and per-model weight or density to search"
            )
            raise ValueError(f"{value!r} {why} (use one of: {', '.join(fits)})")
        return value

    @model_validator(mode="after")
    def _x0_inside_the_ranges(self) -> PSOptions:
        for key in ("weight_range", "density_range"):
            lo, hi = getattr(self, key)
            if not lo < hi:
                raise ValueError(f"{key} [{lo}, {hi}]: the lower bound must be below the upper")
            if not lo <= self.x0 <= hi:
                raise ValueError(f"x0 {self.x0} lies outside {key} [{lo}, {hi}]")
        return self


@register
class PS(GenomeCMAES):
    """CMA-ES over DARE-TIES weights and densities (parameter-space evolutionary merge).

    Args:
        models: Source model names (their task vectors are merged), in genome order.
        base_model: The common ancestor θ_base.
        seed: Root seed.
        options: :class:`PSOptions` (or a dict of them).
        num_layers: Number of transformer blocks (needed for ``groups: per_layer``).
    """

    name = "ps"
    Options = PSOptions

    def __init__(
        self,
        models: list[str],
        base_model: str,
        *,
        seed: int = 0,
        options: PSOptions | dict[str, Any] | None = None,
        num_layers: int | None = None,
    ) -> None:
        super().__init__()
        self.options = _options(options)
        opts = self.options
        if opts.models is not None:
            models = list(opts.models)
        if not models:
            raise RecipeError("ps: no source models to merge (models: [...] besides the base)")
        if base_model in models:
            raise RecipeError(f"ps: the base model {base_model!r} is also listed as a source")
        self.models = list(models)
        self.base_model = base_model
        if opts.groups == "per_layer":
            layers = opts.num_layers or num_layers
            if not layers:
                raise RecipeError("ps: groups: per_layer needs num_layers (not known for the base)")
            self.group_names = ["embed", *(f"layer{i}" for i in range(layers)), "rest"]
        else:
            self.group_names = ["all"]
        self.keys = genome_keys(opts.method)
        g = len(self.group_names)
        n = len(self.keys) * len(self.models) * g
        ranges = {"weight": opts.weight_range, "density": opts.density_range}
        lo = [ranges[k][0] for k in self.keys for _ in range(g)]
        hi = [ranges[k][1] for k in self.keys for _ in range(g)]
        self.es = CMAES(
            np.full(n, opts.x0),
            opts.sigma0,
            seed=seed,
            popsize=opts.popsize,
            bounds=(lo * len(self.models), hi * len(self.models)),
            options=opts.cma_options,
        )

    @classmethod
    def from_config(cls, options: Mapping[str, Any], context: SearchContext) -> PS:
        """Build from a config's ``options`` and the run's search context.

        Uses ``context.models`` (every model but the base is a source unless
        ``options.models`` says otherwise), ``context.base_model``, ``context.seed`` and,
        for ``per_layer``, ``context.num_layers[base_model]``.
        """
        base = context.base_model
        if not base:
            raise RecipeError("base_model: ps needs the common ancestor (task vectors need one)")
        names = [m for m in context.models if m != base]
        return cls(
            names,
            base,
            seed=context.seed,
            options=_options(options),
            num_layers=context.num_layers.get(base),
        )

    # -- genome <-> recipe --------------------------------------------------------------------
    def _split(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Genome key (weight, density) → its values, shape ``(models, groups)``."""
        g = len(self.group_names)
        per = x.reshape(len(self.models), len(self.keys) * g)
        return {k: per[:, i * g : (i + 1) * g] for i, k in enumerate(self.keys)}

    def _value(self, values: np.ndarray) -> Any:
        if len(values) == 1:
            return float(values[0])
        opts = self.options
        entries: list[dict[str, Any]] = [{"filter": opts.embed_filter, "value": float(values[0])}]
        for i, v in enumerate(values[1:-1]):
            entries.append({"filter": opts.layer_filter.format(i=i), "value": float(v)})
        entries.append({"value": float(values[-1])})
        return entries

    def decode(self, x: np.ndarray) -> dict[str, Any]:
        """The recipe (DARE-TIES by default) of a genome vector."""
        values = self._split(np.asarray(x, dtype=np.float64))
        recipe: dict[str, Any] = {
            "merge_method": self.options.method,
            "base_model": self.base_model,
            "models": [
                {
                    "model": name,
                    "parameters": {key: self._value(v[k]) for key, v in values.items()},
                }
                for k, name in enumerate(self.models)
            ],
        }
        if self.options.parameters:
            recipe["parameters"] = dict(self.options.parameters)
        if self.options.dtype:
            recipe["dtype"] = self.options.dtype
        return recipe

    def describe(self, x: np.ndarray) -> dict[str, Any]:
        """Weights (and densities) per model and group."""
        values = self._split(np.asarray(x, dtype=np.float64))
        return {
            name: {
                key: dict(zip(self.group_names, map(float, v[k]), strict=True))
                for key, v in values.items()
            }
            for k, name in enumerate(self.models)
        }


def _options(options: PSOptions | Mapping[str, Any] | None) -> PSOptions:
    if isinstance(options, PSOptions):
        return options
    return validate_options(PSOptions, options or {}, "algorithm")  # type: ignore[no-any-return]
