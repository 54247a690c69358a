"""CycleQD — quality diversity with cycling quality (Kuroki et al., 2025), METHODS.md §4.

K skill tasks, one MAP-Elites archive per task
(:class:`~shoal.search.algorithms.qd_archive.GridArchive`).
In archive k the quality is the mean score on task k and the behaviour is the vector of
mean scores on the other K − 1 tasks, binned over [0.85 × weakest expert, 1.15 × strongest
expert] per task (15 bins per axis by default). The quality task q cycles every generation
(q ← (q + 1) mod K; ``cycling: false`` keeps q on the first task, the ablation); a
generation draws its children from archive q:

1. two distinct parents, by elite sampling (:func:`elite_weights`) or uniformly;
2. crossover by merging, θ = θ_base + Σ_i ω_i τ_i / Σ_i ω_i, ω_i ~ N(1, 0.01²);
3. SVD mutation along the task-q expert's task vector (METHODS.md §1), or Gaussian noise;
4. every child is scored on all K tasks and inserted into every archive it improves.

The seeds are the K experts, scored and inserted the same way (their scores also fix the
default behaviour ranges), then any further ``seeds`` — an earlier stage's result, say
PS's, named by its stage — scored and inserted like any child. After ``generations``
generations one last candidate is asked: the aggregation θ_base + Σ_k β_k τ_k of the
elites with β = softmax(quality / T) (the paper's final model; not in the reference code).
Once told, it is :attr:`CycleQD.best`, so the runner writes it as ``best/``; before that (a
run stopped by its budget) the best is the elite with the highest mean over the K tasks.

Recipes (built by the executors, ``shoal.executors.build``)::

    seed        {"model": EXPERT}            (then {"model": SEED} for each of ``seeds``)
    child       {"merge_method": "task_arithmetic", "base_model": BASE,
                 "models": [{"model": REF_A, "parameters": {"weight": ω_A / Σω}},
                            {"model": REF_B, "parameters": {"weight": ω_B / Σω}}],
                 "parameters": {"lambda": 1.0, "normalize": false},
                 "svd_mutation": {"expert": EXPERT_q, "base": BASE, "w_max": 0.1,
                                  "rank": null, "seed": s}}      # or "mutation": σ
    aggregate   task_arithmetic over the elites' references with weights β

REF is an expert's name or ``store:<key>`` of an elite (``keep_models``: every merged
candidate is stored; :meth:`CycleQD.references` names those still in some archive).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationInfo, field_validator

from shoal.errors import RecipeError, StateError, TaskError
from shoal.search.algorithms.base import (
    STORE_PREFIX,
    Algorithm,
    AlgorithmOptions,
    Best,
    SearchContext,
    choose_index,
    model_ref,
    register,
    validate_options,
)
from shoal.search.algorithms.qd_archive import Elite, GridArchive
from shoal.tasks.base import Scores

__all__ = [
    "CycleQD",
    "CycleQDOptions",
    "aggregation_weights",
    "crossover_weights",
    "default_ranges",
    "elite_weights",
    "sample_parents",
]

#: (a_low, a_high) of each elite-sampling form (METHODS.md §4 step 1)
SAMPLING_BOUNDS = {"paper": (0.5, 0.8), "reference": (0.5, 1.3)}


class CycleQDOptions(AlgorithmOptions):
    """Options of ``algorithm: cycleqd`` (defaults: the published setting)."""

    experts: dict[str, str] = Field(
        description="fitness task name -> the model that is that skill's expert (required): "
        "its seed, and the task vector of the SVD mutation while the task is the quality"
    )
    tasks: list[str] | None = Field(
        None, description="the skill tasks, in cycling order (None: every fitness task)"
    )
    seeds: list[str] = Field(
        default_factory=list,
        description="further models to seed the archives with after the experts (e.g. an "
        "earlier stage's result, by the stage's name): scored and inserted like a child; "
        "the behaviour ranges stay the experts'",
    )
    generations: int = Field(1200, ge=0, description="generations before the aggregation")
    children: int = Field(1, ge=1, description="children per generation (one ask)")
    bins: int = Field(
        15, gt=0, le=1000, description="bins per behaviour axis (the report draws bins² grids)"
    )
    range_scale: tuple[float, float] = Field(
        (0.85, 1.15),
        description="default behaviour range of a task: [lo × weakest expert, hi × strongest "
        "expert] on that task",
    )
    ranges: dict[str, tuple[float, float]] | None = Field(
        None, description="task -> fixed behaviour range [lo, hi], instead of range_scale"
    )
    sampling: Literal["paper", "reference", "uniform"] = Field(
        "paper",
        description="parent sampling: paper = elite weights over [0.5, 0.8]; reference = "
        "over [0.5, 1.3] (the reference code); uniform = the ablation",
    )
    cycling: bool = Field(
        True,
        description="cycle the quality task every generation (False: the ablation, the "
        "first task is the quality throughout)",
    )
    omega_std: float = Field(0.01, ge=0.0, description="std of ω ~ N(1, std²) in the crossover")
    mutation: Literal["svd", "gaussian", "none"] = Field(
        "svd", description="svd (published), gaussian (the ablation) or none"
    )
    w_max: float = Field(0.1, ge=0.0, description="SVD mutation: w ~ U[0, w_max] per σ")
    svd_rank: int | None = Field(
        None, ge=1, description="keep the top r singular triplets per matrix (None: all)"
    )
    mutation_std: float = Field(0.0003, ge=0.0, description="Gaussian mutation σ (ablation)")
    aggregate: Literal["all_elites", "best_per_task", "none"] = Field(
        "all_elites",
        description="final merge over every elite of every archive (METHODS.md §4), over "
        "the best elite of each archive, or none (best = the elite with the best mean)",
    )
    temperature: float = Field(1.0, gt=0.0, description="T in β = softmax(quality / T)")
    seed: int = Field(0, ge=0, description="root seed of the algorithm's random choices")

    @field_validator("seeds")
    @classmethod
    def _seeds_are_new_models(cls, seeds: list[str], info: ValidationInfo) -> list[str]:
        """Each seed once and none an expert (it would be scored and inserted twice); checked
        with the options, so also for a later stage before the run starts."""
        experts = set((info.data.get("experts") or {}).values())
        for i, m in enumerate(seeds):
            if m in experts or m in seeds[:i]:
                raise ValueError(f"{m!r} (entry {i}) is already a seed or an expert")
        return seeds


# -- the maths (METHODS.md §4), plain numpy --------------------------------------------------------


def default_ranges(
    expert_means: np.ndarray, scale: tuple[float, float] = (0.85, 1.15)
) -> list[tuple[float, float]]:
    """Per task j: [scale_lo × min_e S_ej, scale_hi × max_e S_ej] over the experts' means.

    ``expert_means`` is (experts × tasks). A degenerate range (every expert scores 0 on a
    task, so lo = hi) becomes [lo, lo + 1].
    """
    lo = scale[0] * expert_means.min(axis=0)
    hi = scale[1] * expert_means.max(axis=0)
    return [(float(a), float(b) if b > a else float(a) + 1.0) for a, b in zip(lo, hi, strict=True)]


def elite_weights(columns: np.ndarray, a_low: float = 0.5, a_high: float = 0.8) -> np.ndarray:
    """Unnormalised elite-sampling weights, METHODS.md §4 step 1.

    p_j ∝ Π_i (a_low + norm(f_{j,i}) · (a_high − a_low)), norm = min-max over the elites
    of each column (a constant column normalises to 0 and so weighs every elite alike).

    Args:
        columns: (elites × coordinates): the quality, then the behaviour values.
    """
    lo, hi = columns.min(axis=0), columns.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    norm = np.where(hi > lo, (columns - lo) / span, 0.0)
    return np.prod(a_low + norm * (a_high - a_low), axis=1)


def sample_parents(weights: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """Two distinct indices: the first ∝ w, the second ∝ w among the rest (w > 0, as
    :func:`elite_weights` and uniform sampling give).

    P(first = i, second = j) = w_i / Σw · w_j / (Σw − w_i). With one elite both are it
    (the crossover then gives that elite back and the mutation explores).
    """
    a = choose_index(rng, weights)
    if len(weights) == 1:
        return a, a
    rest = weights.astype(np.float64).copy()
    rest[a] = 0.0
    return a, choose_index(rng, rest)


def crossover_weights(omega: np.ndarray) -> np.ndarray:
    """Task-vector weights ω_i / Σ_i ω_i of the merge crossover, METHODS.md §4 step 2."""
    return omega / omega.sum()


def aggregation_weights(qualities: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """β = softmax(quality / T), METHODS.md §4 "Final model"."""
    z = qualities / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def _skill_tasks(o: CycleQDOptions, task_names: Sequence[str]) -> list[str]:
    """The skill tasks, in cycling order: ``tasks`` if given, else the run's fitness tasks,
    else the experts' tasks."""
    return list(o.tasks if o.tasks is not None else (task_names or o.experts))


def _check_options(
    o: CycleQDOptions, tasks: list[str], models: Sequence[str], task_names: Sequence[str]
) -> None:
    """Raise a one-line :class:`RecipeError` naming the option that does not fit the run."""
    if len(tasks) < 2:
        raise RecipeError(f"algorithm.tasks: cycleqd needs at least two skill tasks, got {tasks}")
    if len(set(tasks)) != len(tasks):
        raise RecipeError(f"algorithm.tasks: a task is named twice in {tasks}")
    for t in tasks:
        if task_names and t not in task_names:
            raise RecipeError(
                f"algorithm.tasks: {t!r} is not a fitness task (have {', '.join(task_names)})"
            )
        if t not in o.experts:
            raise RecipeError(f"algorithm.experts: task {t!r} has no expert model")
    owner: dict[str, str] = {}
    for t, m in o.experts.items():
        if t not in tasks:
            raise RecipeError(f"algorithm.experts.{t}: not one of the skill tasks {tasks}")
        if m in owner:  # it would be seeded twice, and two archives would share a vector
            raise RecipeError(
                f"algorithm.experts.{t}: {m!r} is already the expert of {owner[m]!r} "
                "(each task needs its own expert model)"
            )
        owner[m] = t
        if models and m not in models:
            raise RecipeError(
                f"algorithm.experts.{t}: unknown model {m!r} (known: {', '.join(models)})"
            )
    unknown = [m for m in o.seeds if models and m not in models]
    if unknown:
        raise RecipeError(
            f"algorithm.seeds: unknown model {unknown[0]!r} (known: {', '.join(models)})"
        )
    lo_s, hi_s = o.range_scale
    if not 0 <= lo_s <= hi_s:
        raise RecipeError(f"algorithm.range_scale: [{lo_s}, {hi_s}] is inverted or negative")
    for t, (lo, hi) in (o.ranges or {}).items():
        if t not in tasks:
            raise RecipeError(f"algorithm.ranges.{t}: not one of the skill tasks {tasks}")
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise RecipeError(f"algorithm.ranges.{t}: range [{lo}, {hi}] is empty or inverted")


# -- the algorithm ---------------------------------------------------------------------------------


@register
class CycleQD(Algorithm):
    """CycleQD as an ask/tell state machine (see the module docstring for the recipes).

    Args:
        options: :class:`CycleQDOptions` or a dict of them.
        base_model: Name of the experts' common base (task vectors are taken from it).
        models: Names of the run's models (to check ``experts``).
        task_names: The run's fitness tasks, in config order.
    """

    name = "cycleqd"
    format_version = 1
    Options = CycleQDOptions
    keep_models = True

    def __init__(
        self,
        options: CycleQDOptions | Mapping[str, Any],
        base_model: str | None,
        models: Sequence[str] = (),
        task_names: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not isinstance(options, CycleQDOptions):
            options = validate_options(CycleQDOptions, options, "algorithm")
        assert isinstance(options, CycleQDOptions)
        self.options = o = options
        self.check_block(o, models=models, task_names=task_names, base_model=base_model)
        assert base_model is not None
        self.base = base_model
        self.tasks = _skill_tasks(o, task_names)
        self.K = len(self.tasks)
        self.expert_of = [o.experts[t] for t in self.tasks]
        self.seed_models = [*self.expert_of, *o.seeds]  # asked in this order, first of all
        self._rng = np.random.default_rng(np.random.SeedSequence(o.seed))
        self.archives: list[GridArchive] | None = None  # made once every seed is scored
        # the seeds are the experts, then ``options.seeds``: asked first, held until all
        # are scored
        self._seeds_asked = 0
        self._seed_means: list[list[float] | None] = []  # None: a seed that failed
        self.generation = 0
        self.q = 0  # the current quality task
        self._asked_aggregate = False
        self._aggregate: Best | None = None
        self.last_status: list[list[int]] = []  # per child of the last tell, per archive

    @classmethod
    def check_block(
        cls,
        options: BaseModel,
        *,
        models: Sequence[str],
        task_names: Sequence[str],
        base_model: str | None,
    ) -> None:
        """The checks of :meth:`__init__` that need no model: a base, two or more skill
        tasks, an expert for each (not the base), known models, ranges not inverted."""
        assert isinstance(options, CycleQDOptions)
        if base_model is None:
            raise RecipeError(
                "base_model: cycleqd merges task vectors and needs the experts' common base"
            )
        for t, m in options.experts.items():
            if m == base_model:
                raise RecipeError(
                    f"algorithm.experts.{t}: {m!r} is the base model, whose task vector is "
                    "zero (an expert is a fine-tune of the base)"
                )
        _check_options(options, _skill_tasks(options, task_names), models, task_names)

    @classmethod
    def from_config(cls, options: Mapping[str, Any], context: SearchContext) -> CycleQD:
        """Build from a config's options and the run's context (base, models, tasks, seed)."""
        opts = dict(options)
        opts.setdefault("seed", int(context.seed))
        return cls(opts, context.base_model, list(context.models), list(context.task_names))

    # -- recipes ------------------------------------------------------------------------------
    def _child_recipe(self, refs: tuple[str, str]) -> dict[str, Any]:
        o, rng = self.options, self._rng
        omega = rng.normal(1.0, o.omega_std, size=2)  # §4 step 2: ω_i ~ N(1, 0.01²)
        w = crossover_weights(omega)
        recipe: dict[str, Any] = {
            "merge_method": "task_arithmetic",
            "base_model": self.base,
            "models": [
                {"model": r, "parameters": {"weight": float(wi)}}
                for r, wi in zip(refs, w, strict=True)
            ],
            "parameters": {"lambda": 1.0, "normalize": False},
        }
        if o.mutation == "svd":  # §4 step 3, METHODS.md §1 svd_mutation
            recipe["svd_mutation"] = {
                "expert": self.expert_of[self.q],
                "base": self.base,
                "w_max": o.w_max,
                "rank": o.svd_rank,
                # the draw of w is part of the recipe, so the recipe alone rebuilds the model
                "seed": int(rng.integers(2**31)),
            }
        elif o.mutation == "gaussian" and o.mutation_std > 0:
            recipe["mutation"] = o.mutation_std  # N(0, σ²) from the work item's seed
        return recipe

    def _parents(self) -> tuple[str, str]:
        assert self.archives is not None
        elites = [e for _, e in self.archives[self.q]]
        if self.options.sampling == "uniform":
            weights = np.ones(len(elites))
        else:
            a_low, a_high = SAMPLING_BOUNDS[self.options.sampling]
            cols = np.array([[e.quality, *e.behaviour] for e in elites], dtype=np.float64)
            weights = elite_weights(cols, a_low, a_high)
        a, b = sample_parents(weights, self._rng)
        return str(elites[a].data["ref"]), str(elites[b].data["ref"])

    def aggregate_recipe(self) -> dict[str, Any]:
        """θ_base + Σ_k β_k τ_k over the elites, β = softmax(quality / T) (METHODS.md §4).

        ``all_elites``: every elite of every archive, each with its quality in that archive;
        ``best_per_task``: the best elite of each archive. A model picked in several
        archives gets the sum of its β (one entry per model).
        """
        assert self.archives is not None
        if self.options.aggregate == "best_per_task":
            elites = list(self._best_elites().values())
        else:
            elites = [e for archive in self.archives for _, e in archive]
        picked = [(str(e.data["ref"]), e.quality) for e in elites]
        beta = aggregation_weights(np.array([q for _, q in picked]), self.options.temperature)
        weights: dict[str, float] = {}
        for (ref, _), b in zip(picked, beta, strict=True):
            weights[ref] = weights.get(ref, 0.0) + float(b)
        return {
            "merge_method": "task_arithmetic",
            "base_model": self.base,
            "models": [{"model": r, "parameters": {"weight": w}} for r, w in weights.items()],
            "parameters": {"lambda": 1.0, "normalize": False},
        }

    # -- ask/tell -----------------------------------------------------------------------------
    @property
    def _aggregating(self) -> bool:
        return self.options.aggregate != "none"

    def _ask(self, n: int | None) -> list[dict[str, Any]]:
        if n is not None and n < 1:
            raise StateError(f"cycleqd: ask({n}) — ask for at least one recipe")
        todo = len(self.seed_models) - self._seeds_asked
        if todo > 0:
            first, count = self._seeds_asked, min(n or todo, todo)
            self._seeds_asked += count
            return [{"model": m} for m in self.seed_models[first : first + count]]
        if self.generation < self.options.generations:
            return [self._child_recipe(self._parents()) for _ in range(n or self.options.children)]
        if self._aggregating and not self._asked_aggregate:
            self._asked_aggregate = True
            return [self.aggregate_recipe()]
        raise StateError("cycleqd: finished (see stop()); nothing is left to ask")

    def _means(self, scores: Scores) -> list[float] | None:
        """The skill tasks' means, or ``None`` for a candidate that failed (the runner
        tells a failure as NaN scores: it built no model, so it may enter no archive)."""
        missing = [t for t in self.tasks if t not in scores]
        if missing:
            raise StateError(f"cycleqd: scores lack skill task(s) {missing}")
        means = [float(np.mean(scores[t])) if len(scores[t]) else 0.0 for t in self.tasks]
        return means if all(map(math.isfinite, means)) else None

    def _insert(
        self, recipe: dict[str, Any], means: list[float] | None, evaluation: int
    ) -> list[int]:
        """§4 step 4: into every archive whose cell is empty or holds a worse elite."""
        assert self.archives is not None
        if means is None:  # failed
            return [0] * self.K
        ref = model_ref(recipe)
        data = {"ref": ref, "recipe": recipe, "means": means, "evaluation": evaluation}
        status = []
        for k, archive in enumerate(self.archives):
            behaviour = [means[j] for j in range(self.K) if j != k]
            status.append(int(archive.add_one(means[k], behaviour, data)))
        return status

    def _tell(self, recipes: list[dict[str, Any]], scores: list[Scores]) -> None:
        first = self.evaluations
        if self.archives is None:  # the seeds: kept until all are scored
            self._seed_means += [self._means(s) for s in scores]  # None: failed
            if len(self._seed_means) == len(self.seed_models):
                self._make_archives()
            return
        if self._asked_aggregate and self._aggregate is None:
            means = self._means(scores[0])
            if means is not None:  # a failed aggregate leaves the best elite as the best
                self._aggregate = Best(
                    recipe=recipes[0],
                    fitness=float(np.mean(means)),
                    evaluation=first,
                    extra={"means": dict(zip(self.tasks, means, strict=True)), "aggregate": True},
                )
            return
        self.last_status = [
            self._insert(r, self._means(s), first + i)
            for i, (r, s) in enumerate(zip(recipes, scores, strict=True))
        ]
        self.generation += 1
        if self.options.cycling:
            self.q = (self.q + 1) % self.K  # the quality task cycles every generation

    def _make_archives(self) -> None:
        o = self.options
        experts = self._seed_means[: self.K]
        failed = [m for m, means in zip(self.seed_models, experts, strict=False) if means is None]
        if failed:
            raise TaskError(
                f"cycleqd: expert {failed[0]!r} failed to build or score, and the archives' "
                "ranges are set from every expert's scores"
            )
        ranges = default_ranges(np.array(experts, dtype=np.float64), o.range_scale)
        for j, t in enumerate(self.tasks):
            if o.ranges and t in o.ranges:
                ranges[j] = (float(o.ranges[t][0]), float(o.ranges[t][1]))
        self.archives = [
            GridArchive(o.bins, [ranges[j] for j in range(self.K) if j != k]) for k in range(self.K)
        ]
        self.last_status = [
            self._insert({"model": m}, self._seed_means[i], i)
            for i, m in enumerate(self.seed_models)
        ]

    # -- results ------------------------------------------------------------------------------
    def stop(self) -> list[str]:
        """Done once the generations (and the aggregation, if any) are evaluated."""
        if self.archives is None or self.generation < self.options.generations:
            return []
        if self._aggregating and not self._asked_aggregate:  # asked and told in one batch
            return []
        return [f"{self.options.generations} generations done"]

    def _best_elite(self) -> Best | None:
        best: tuple[float, int, dict[str, Any]] | None = None
        for archive in self.archives or []:
            for _, e in archive:
                key = (float(np.mean(e.data["means"])), -int(e.data["evaluation"]))
                if best is None or key > best[:2]:
                    best = (*key, e.data)
        if best is None:
            return None
        data = best[2]
        return Best(
            recipe=data["recipe"],
            fitness=best[0],
            evaluation=int(data["evaluation"]),
            extra={"ref": data["ref"], "means": dict(zip(self.tasks, data["means"], strict=True))},
        )

    @property
    def best(self) -> Best | None:
        """The aggregation once told; before, the elite with the best mean over the tasks."""
        return self._aggregate if self._aggregate is not None else self._best_elite()

    def _best_elites(self) -> dict[str, Elite]:
        """Task -> the best elite of its archive (the first maximum in cell order)."""
        return {
            t: max((e for _, e in archive), key=lambda e: e.quality)
            for t, archive in zip(self.tasks, self.archives or [], strict=False)
            if len(archive)
        }

    def specialists(self) -> dict[str, Best]:
        """The best elite of each archive, as ``best-<task>``."""
        return {
            f"best-{t}": Best(
                recipe=e.data["recipe"],
                fitness=e.quality,
                evaluation=int(e.data["evaluation"]),
                extra={"ref": e.data["ref"]},
            )
            for t, e in self._best_elites().items()
        }

    def references(self) -> set[str]:
        """Store keys of the elites still in some archive (experts are source models)."""
        out = set()
        for archive in self.archives or []:
            for _, e in archive:
                ref = str(e.data["ref"])
                if ref.startswith(STORE_PREFIX):
                    out.add(ref[len(STORE_PREFIX) :])
        return out

    def stats(self) -> dict[str, dict[str, float]]:
        """Per skill task: its archive's coverage, QD score, best and mean quality."""
        return {t: vars(a.stats()) for t, a in zip(self.tasks, self.archives or [], strict=False)}

    # -- state --------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        agg = self._aggregate
        return {
            "options": self.options.model_dump(mode="json"),
            "base": self.base,
            "tasks": self.tasks,
            "seeds_asked": self._seeds_asked,
            "seed_means": self._seed_means,
            "archives": None if self.archives is None else [a.state_dict() for a in self.archives],
            "generation": self.generation,
            "q": self.q,
            "asked_aggregate": self._asked_aggregate,
            "aggregate": None
            if agg is None
            else {
                "recipe": agg.recipe,
                "fitness": agg.fitness,
                "evaluation": agg.evaluation,
                "extra": agg.extra,
            },
            "rng": self._rng.bit_generator.state,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        saved = {"seeds": [], **state["options"]}  # a state from before ``seeds`` existed
        if (
            saved != self.options.model_dump(mode="json")
            or state["base"] != self.base
            or state["tasks"] != self.tasks
        ):
            raise StateError("cycleqd: saved state was made with other options, base or tasks")
        self._seeds_asked = int(state["seeds_asked"])
        self._seed_means = [None if m is None else list(map(float, m)) for m in state["seed_means"]]
        arch = state["archives"]
        self.archives = None if arch is None else [GridArchive.from_state_dict(a) for a in arch]
        self.generation = int(state["generation"])
        self.q = int(state["q"])
        self._asked_aggregate = bool(state["asked_aggregate"])
        agg = state["aggregate"]
        self._aggregate = None if agg is None else Best(**agg)
        self._rng.bit_generator.state = state["rng"]
        self.last_status = []
