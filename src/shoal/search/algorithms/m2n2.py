"""M2N2 — model merging of natural niches (Abrantes et al., 2025), METHODS.md §3.

An archive of P models evolves by steady-state steps. Each step picks parent A in
proportion to a fitness that makes models compete for the examples they solve
(resource competition), picks parent B by *attraction* (how much B brings where A
is weak), merges them with the split-point crossover and replaces the archive's
least fit member.

This module is a pure state machine over the archive's score matrix S (P × N):
:meth:`M2N2.ask` returns mergekit-style recipes, :meth:`M2N2.tell` takes their
per-example scores. The maths (:func:`resource_fitness`, :func:`attraction`,
:func:`select_parents`, :func:`drop_index`) are plain numpy functions, tested on
their own.

Recipes (see ``docs/m2n2.md``; the executors build them, ``shoal.executors.build``)::

    seed model      {"model": NAME}
    from scratch    {"merge_method": "random_init", "parameters": {"std": 0.01, "member": i}}
    child           {"merge_method": "splitpoint",
                     "models": [{"model": "store:<key A>"}, {"model": "store:<key B>"}],
                     "parameters": {"split": w_s, "ratio": w_m, "angle": "segment"},
                     "mutation": 0.01}                      # σ, only from scratch

The random draws of ``random_init`` and ``mutation`` come from the work item's seed
(``candidate_seed(root, generation, index)``). ``split`` is a fraction of the
flattened parameter vector (index = round(split·n)); with ``chromosomes`` it is a
list of ``{filter, value}`` entries, one per chromosome, each a fraction of that
chromosome's own flat vector. Every evaluated model is kept in the run's store under
:func:`~shoal.search.algorithms.base.store_key` of its recipe, and later recipes name it
``store:<key>``.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from shoal.errors import RecipeError, StateError
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
from shoal.tasks.base import Scores

__all__ = [
    "M2N2",
    "M2N2Options",
    "attraction",
    "capacity",
    "coverage",
    "drop_index",
    "least_fit",
    "mean_entropy",
    "partner_weights",
    "resource_fitness",
    "select_parents",
]


class M2N2Options(AlgorithmOptions):
    """Options of ``algorithm: m2n2`` (defaults: the published setting)."""

    archive_size: int = Field(20, ge=2, description="P, number of models in the archive")
    alpha: float = Field(
        1.0, ge=0.0, description="competition exponent α in z_j^α (0: no competition, a plain GA)"
    )
    matchmaker: Literal["attraction", "fitness"] = Field(
        "attraction", description="how parent B is chosen: ∝ attraction g(A, B) or ∝ fitness"
    )
    splitpoint: bool = Field(
        True, description="draw a split point; false: one SLERP of the whole vector at t = w_m"
    )
    angle: Literal["segment", "global"] = Field(
        "segment",
        description="SLERP angle per side of the split (described form) or over the whole "
        "vector (reference code)",
    )
    init: Literal["seeds", "scratch"] = Field(
        "seeds",
        description="seeds: start from the source models, warm up with random merges among "
        "them; scratch: archive_size random models N(0, init_std²)",
    )
    init_std: float = Field(0.01, gt=0.0, description="std of the from-scratch initialisation")
    initial: int = Field(
        2,
        ge=2,
        description="random models that start the archive from scratch (reference code: 2); "
        "children fill the rest",
    )
    warmup: Literal["select", "random"] = Field(
        "select",
        description="parents while the archive fills: select = M2N2's own selection among "
        "the members so far (reference code, whose empty slots score 0 and are never "
        "picked); random = uniform pairs of the initial members (seeds)",
    )
    mutation_std: float | None = Field(
        None,
        ge=0.0,
        description="Gaussian mutation σ added to each child; default 0.01 from scratch, "
        "0 from seeds",
    )
    chromosomes: list[str] | None = Field(
        None,
        description="tensor-name substrings, one per chromosome (the last may be '' = the "
        "rest); each chromosome gets its own split point and ratio. None: one vector",
    )
    capacity: Literal["auto", "binary", "max"] = Field(
        "auto",
        description="c_j: 1 (binary scores) or max_k S_kj (continuous); auto: binary when "
        "every score is 0 or 1",
    )
    eps: float = Field(1e-8, gt=0.0, description="ε in z_j^α + ε")
    batch_size: int = Field(
        1,
        ge=1,
        description="children drawn from one archive snapshot. 1 = the published "
        "steady-state algorithm; k > 1 = the batched variant (k children sampled against "
        "the same archive, then inserted one after another)",
    )
    tasks: list[str] | None = Field(
        None, description="fitness tasks whose per-example scores form S (None: all, by name)"
    )
    seed: int = Field(0, ge=0, description="root seed of the algorithm's random choices")

    @property
    def chromosome_filters(self) -> list[str]:
        """Chromosome substrings, ending with '' (the rest); ``['']`` for one vector."""
        names = list(self.chromosomes or [])
        if not names or names[-1] != "":
            names.append("")
        return names

    @property
    def sigma(self) -> float:
        """The mutation σ actually used."""
        if self.mutation_std is not None:
            return self.mutation_std
        return 0.01 if self.init == "scratch" else 0.0


# -- the maths (METHODS.md §3), shared by every execution path ------------------------------------


def capacity(scores: np.ndarray, mode: str = "auto") -> np.ndarray:
    """c_j = 1 for binary scores, max_k S_kj for continuous ones (METHODS.md §3 step 1)."""
    binary = mode == "binary" or (
        mode == "auto" and bool(np.all((scores == 0.0) | (scores == 1.0)))
    )
    if binary:
        return np.ones(scores.shape[1])
    return scores.max(axis=0)


def example_weights(
    scores: np.ndarray,
    alpha: float,
    eps: float,
    cap: np.ndarray | None = None,
    z: np.ndarray | None = None,
) -> np.ndarray:
    """w_j = c_j / (z_j^α + ε), z_j = Σ_k S_kj — the value of one unit of example j.

    ``z``: the column sums when known (M2N2 keeps them as its archive changes).
    """
    z = scores.sum(axis=0) if z is None else z
    c = capacity(scores) if cap is None else cap
    zp = z if alpha == 1.0 else np.power(z, alpha)  # numpy: 0^0 = 1, so α = 0 is no competition
    return c / (zp + eps)


def resource_fitness(
    scores: np.ndarray, alpha: float = 1.0, eps: float = 1e-8, cap: np.ndarray | None = None
) -> np.ndarray:
    """f_i = Σ_j c_j S_ij / (z_j^α + ε) — METHODS.md §3 step 1 (paper Eq. 3)."""
    return scores @ example_weights(scores, alpha, eps, cap)


def attraction(
    scores: np.ndarray,
    a: int,
    alpha: float = 1.0,
    eps: float = 1e-8,
    cap: np.ndarray | None = None,
) -> np.ndarray:
    """g(A, B) = Σ_j c_j / (z_j^α + ε) · max(S_Bj − S_Aj, 0) for every B — §3 step 3 (Eq. 4)."""
    return _gain(scores, a, example_weights(scores, alpha, eps, cap))


def _gain(scores: np.ndarray, a: int, weights: np.ndarray, binary: bool = False) -> np.ndarray:
    """Σ_j w_j · max(S_Bj − S_Aj, 0) for every B: :func:`attraction` given the example weights.

    ``binary``: every score is 0 or 1, where max(S_Bj − S_Aj, 0) = S_Bj · (1 − S_Aj), so the
    gain is one product with the weights of the examples A misses: the same terms in the
    same order, without an archive-sized temporary.
    """
    if binary:
        return scores @ (weights * (1.0 - scores[a]))
    gain = scores - scores[a]
    # in place: a second archive-sized temporary cost more than the product (M2N2 asks this
    # once a child)
    np.maximum(gain, 0.0, out=gain)
    return gain @ weights


def select_parents(
    scores: np.ndarray,
    rng: np.random.Generator,
    *,
    alpha: float = 1.0,
    eps: float = 1e-8,
    matchmaker: str = "attraction",
    capacity_mode: str = "auto",
    weights: np.ndarray | None = None,
    fitness: np.ndarray | None = None,
    binary: bool = False,
) -> tuple[int, int]:
    """Parent A ∝ fitness, parent B ∝ attraction to A (or ∝ fitness); B ≠ A.

    Fallbacks (METHODS.md §3): all attraction scores 0 → B ∝ fitness; all fitness
    0 → uniform. B is drawn among the other members (a child of A with itself is A).
    ``weights`` and ``fitness``: the example weights and fitness of ``scores`` when known
    (both or neither; ``capacity_mode`` is then not used); ``binary``: every score is
    known to be 0 or 1 (the same draws, computed faster).
    """
    if weights is None or fitness is None:
        w = example_weights(scores, alpha, eps, capacity(scores, capacity_mode))
        f = scores @ w  # resource_fitness, its example weights kept for the attraction
    else:
        w, f = weights, fitness
    a = choose_index(rng, f) if f.sum() > 0 else int(rng.integers(scores.shape[0]))  # step 2
    g = _gain(scores, a, w, binary) if matchmaker == "attraction" else f.copy()
    return a, choose_index(rng, _with_fallbacks(g, a, f))


def partner_weights(
    scores: np.ndarray,
    a: int,
    fitness: np.ndarray,
    *,
    alpha: float = 1.0,
    eps: float = 1e-8,
    matchmaker: str = "attraction",
    cap: np.ndarray | None = None,
) -> np.ndarray:
    """Unnormalised probabilities of each member being parent B given parent A (§3 step 3).

    ∝ attraction g(A, ·) (or ∝ fitness); all zero → ∝ fitness; still all zero →
    uniform. A itself always gets 0.
    """
    if matchmaker == "attraction":
        weights = attraction(scores, a, alpha, eps, cap)
    else:
        weights = fitness.copy()
    return _with_fallbacks(weights, a, fitness)


def _with_fallbacks(weights: np.ndarray, a: int, fitness: np.ndarray) -> np.ndarray:
    """:func:`partner_weights` from the matchmaker's own ``weights`` (changed in place)."""
    weights[a] = 0.0
    if not weights.sum() > 0:  # no attraction anywhere: fall back to fitness
        weights = fitness.copy()
        weights[a] = 0.0
    if not weights.sum() > 0:  # nobody scores anything: uniform over the others
        weights = np.ones(fitness.shape[0])
        weights[a] = 0.0
    return weights


def drop_index(
    scores: np.ndarray,
    births: Sequence[int],
    *,
    alpha: float = 1.0,
    eps: float = 1e-8,
    capacity_mode: str = "auto",
) -> int:
    """Replacement (§3 step 5): drop the lowest fitness among all P + 1; ties drop the oldest."""
    return least_fit(resource_fitness(scores, alpha, eps, capacity(scores, capacity_mode)), births)


def least_fit(fitness: np.ndarray, births: Sequence[int]) -> int:
    """:func:`drop_index` given the fitness: the lowest, the oldest among equals."""
    lowest = [int(i) for i in np.flatnonzero(fitness == fitness.min())]
    return min(lowest, key=lambda i: births[i])


def coverage(scores: np.ndarray) -> float:
    """Fraction of examples solved (score 1) by at least one member."""
    return float((scores.max(axis=0) >= 1.0).mean()) if scores.size else 0.0


def mean_entropy(scores: np.ndarray) -> float:
    """Mean over examples of the binary entropy (bits) of "solved" across the archive.

    p_j = mean_k S_kj; H_j = −p_j log2 p_j − (1 − p_j) log2(1 − p_j). 0: every member
    agrees on every example; 1: each example solved by half the archive.
    """
    if not scores.size:
        return 0.0
    p = np.clip(scores.mean(axis=0), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p)) - (1 - p) * np.log2(1 - p)
    return float(np.nan_to_num(h, nan=0.0).mean())


# -- the algorithm ---------------------------------------------------------------------------------


@register
class M2N2(Algorithm):
    """M2N2 as an ask/tell state machine (see the module docstring for the recipes).

    Args:
        options: :class:`M2N2Options` or a dict of them.
        seeds: names of the source models (``init: seeds``); their recipes reference them
            by these names.
    """

    name = "m2n2"
    format_version = 1
    Options = M2N2Options
    keep_models = True

    def __init__(
        self, options: M2N2Options | Mapping[str, Any] | None = None, seeds: Sequence[str] = ()
    ) -> None:
        super().__init__()
        if not isinstance(options, M2N2Options):
            options = validate_options(M2N2Options, options or {}, "algorithm")
        assert isinstance(options, M2N2Options)
        self.options = options
        self.seeds = list(seeds)
        if options.init == "seeds" and len(self.seeds) < 2:
            raise RecipeError(f"m2n2 with init: seeds needs ≥ 2 source models, got {self.seeds}")
        if options.init == "seeds" and len(self.seeds) > options.archive_size:
            raise RecipeError(
                f"m2n2: {len(self.seeds)} seeds do not fit archive_size {options.archive_size}"
            )
        self._rng = np.random.default_rng(np.random.SeedSequence(options.seed))
        self.refs: list[str] = []  # archive members: a seed's name or "store:<hash>"
        self.recipes: list[dict[str, Any]] = []
        self.births: list[int] = []  # evaluation index that created each member
        self.scores = np.zeros((0, 0))  # S, (P, N)
        self._task_names: list[str] | None = None
        self._started = 0  # initial members handed out (seeds or random inits)
        self._binary = True  # every score told so far is 0 or 1
        self._stats: _ArchiveStats | None = None  # of self.scores; None: to compute
        self._best: Best | None = None  # of the archive as it is; None: to find
        self._stored: set[str] | None = None  # its members' store keys; None: to list

    @classmethod
    def from_config(cls, options: Mapping[str, Any], context: SearchContext) -> M2N2:
        """Build from a config's options and the run's context.

        The source models become the seeds (``init: seeds``); the root seed and the
        fitness task names come from the context unless the options give them.
        """
        opts = dict(options)
        opts.setdefault("seed", int(context.seed))
        if context.task_names:
            opts.setdefault("tasks", list(context.task_names))
        seeds = list(context.models) if opts.get("init", "seeds") == "seeds" else []
        return cls(opts, seeds=seeds)

    # -- helpers ------------------------------------------------------------------------------
    @property
    def n_initial(self) -> int:
        """Members that start the archive: the seeds, or archive_size random models."""
        if self.options.init == "seeds":
            return len(self.seeds)
        return min(self.options.initial, self.options.archive_size)

    def _initial_recipe(self, i: int) -> dict[str, Any]:
        if self.options.init == "seeds":
            return {"model": self.seeds[i]}
        # "member" only makes the recipes (and so their store keys) distinct; the draw
        # comes from the work item's seed
        return {
            "merge_method": "random_init",
            "parameters": {"std": self.options.init_std, "member": i},
        }

    def _child_recipe(self, a: int, b: int) -> dict[str, Any]:
        o, rng = self.options, self._rng
        names = o.chromosome_filters
        splits = [float(rng.random()) if o.splitpoint else 1.0 for _ in names]
        ratios = [float(rng.random()) for _ in names]  # w_m ~ U(0, 1)
        params: dict[str, Any] = {"angle": o.angle}
        if len(names) > 1:
            params["split"] = _per_chromosome(names, splits)
            params["ratio"] = _per_chromosome(names, ratios)
        else:
            params["split"], params["ratio"] = splits[0], ratios[0]
        recipe: dict[str, Any] = {
            "merge_method": "splitpoint",
            "models": [{"model": self.refs[a]}, {"model": self.refs[b]}],
            "parameters": params,
        }
        if o.sigma > 0:
            recipe["mutation"] = o.sigma  # N(0, σ²) from the work item's seed
        return recipe

    def _parents(self) -> tuple[int, int]:
        o = self.options
        if len(self.refs) < o.archive_size and o.warmup == "random":
            # warm-up: random merges among the initial members until the archive is full;
            # they lead the archive (none is dropped before it is full), less any that failed
            k = sum(birth < self.n_initial for birth in self.births)
            if k < 2:
                return 0, 0
            a = int(self._rng.integers(k))
            b = int(self._rng.integers(k - 1))
            return a, b + (b >= a)
        stats = self._archive_stats()
        return select_parents(
            self.scores,
            self._rng,
            alpha=o.alpha,
            eps=o.eps,
            matchmaker=o.matchmaker,
            weights=stats.weights,
            fitness=stats.fitness,
            binary=self._binary,
        )

    def _archive_stats(self) -> _ArchiveStats:
        """Column sums, capacities, example weights and fitness of the archive as it is.

        Kept until the archive changes. Most children are dropped at once (93 % of
        50,000 on digits), which leaves the archive, and so all of these, as they were.
        """
        mode = self._capacity_mode
        if self._stats is None or self._stats.mode != mode:
            z = self.scores.sum(axis=0)
            cap = capacity(self.scores, mode)
            w = example_weights(self.scores, self.options.alpha, self.options.eps, cap, z)
            self._stats = _ArchiveStats(mode, z, cap, w, self.scores @ w)
        return self._stats

    @property
    def _capacity_mode(self) -> str:
        """``binary`` or ``max``, resolved once per told vector (``auto`` costs a scan)."""
        if self.options.capacity != "auto":
            return self.options.capacity
        return "binary" if self._binary else "max"

    # -- ask/tell -----------------------------------------------------------------------------
    def _ask(self, n: int | None) -> list[dict[str, Any]]:
        n = self.options.batch_size if n is None else n
        if n < 1:
            raise StateError(f"m2n2: ask({n}) — ask for at least one recipe")
        if self._started < self.n_initial:
            count = min(n, self.n_initial - self._started)
            out = [self._initial_recipe(self._started + i) for i in range(count)]
            self._started += count
            return out
        return [self._child_recipe(*self._parents()) for _ in range(n)]

    def _vector(self, scores: Scores) -> np.ndarray | None:
        """The per-example scores over the fitness tasks in order; ``None`` for a failed
        candidate (told as NaN everywhere); a lone non-finite score counts as 0."""
        names = self.options.tasks or sorted(scores)
        if self._task_names is None:
            self._task_names = list(names)
        missing = [t for t in self._task_names if t not in scores]
        if missing:
            raise StateError(f"m2n2: scores lack fitness task(s) {missing}")
        vec = np.concatenate([np.asarray(scores[t], dtype=np.float64) for t in self._task_names])
        if not np.isfinite(vec).all():  # the check is cheaper than nan_to_num's copy
            if not np.isfinite(vec).any():
                return None
            vec = np.nan_to_num(vec, nan=0.0, posinf=0.0, neginf=0.0)  # the worst
        if self.scores.size and vec.shape[0] != self.scores.shape[1]:
            raise StateError(
                f"m2n2: got {vec.shape[0]} per-example scores, the archive holds "
                f"{self.scores.shape[1]}"
            )
        return vec

    def _tell(self, recipes: list[dict[str, Any]], scores: list[Scores]) -> None:
        o = self.options
        for i, (recipe, sc) in enumerate(zip(recipes, scores, strict=True)):
            vec = self._vector(sc)
            if vec is None:  # failed: it left no stored model for a crossover to name
                continue
            self._binary = self._binary and bool(np.all((vec == 0.0) | (vec == 1.0)))
            birth = self.evaluations + i
            if len(self.refs) < o.archive_size:  # room left: the child joins
                ref = model_ref(recipe)
                grown = np.vstack([self.scores, vec]) if self.scores.size else vec[None, :]
                self.scores = grown
            else:  # step 5: drop the least fit of P + 1
                stacked = np.vstack([self.scores, vec])
                d = self._drop_index_with(stacked, vec, birth)
                if d == len(self.refs):
                    continue  # the child itself: the archive stays as it was
                ref = model_ref(recipe)  # only for a child that stays; before any change
                for lst in (self.refs, self.recipes, self.births):
                    del lst[d]
                self.scores = np.delete(stacked, d, axis=0)
            self.refs.append(ref)
            self.recipes.append(recipe)
            self.births.append(birth)
            self._stats = self._best = self._stored = None

    def _drop_index_with(self, stacked: np.ndarray, vec: np.ndarray, birth: int) -> int:
        """:func:`drop_index` of ``stacked``, the archive with ``vec`` appended, from the
        archive's kept column sums: ``S.sum(axis=0) + vec`` is the new sum to the last bit
        (numpy adds the rows of a column in order; tests/search/test_m2n2.py checks it)."""
        o, stats = self.options, self._archive_stats()
        cap = stats.capacity if stats.mode == "binary" else np.maximum(stats.capacity, vec)
        w = example_weights(stacked, o.alpha, o.eps, cap, stats.sums + vec)
        return least_fit(stacked @ w, [*self.births, birth])

    # -- results ------------------------------------------------------------------------------
    def fitness(self) -> np.ndarray:
        """Current resource-competition fitness of each archive member."""
        o = self.options
        if not self.scores.size:
            return np.zeros(0)
        cap = capacity(self.scores, self._capacity_mode)
        return resource_fitness(self.scores, o.alpha, o.eps, cap)

    @property
    def best(self) -> Best | None:
        """The archive member with the best mean fitness-task score (training accuracy)."""
        if not self.refs:
            return None
        if self._best is None:  # the run loop asks after every batch: once per archive
            means = self.scores.mean(axis=1)
            i = int(np.argmax(means))  # first maximum: the earliest-placed member
            self._best = Best(
                recipe=self.recipes[i],
                fitness=float(means[i]),
                evaluation=self.births[i],
                # nothing costly here (coverage and mean_entropy of the archive are
                # functions of self.scores)
                extra={"ref": self.refs[i]},
            )
        return self._best

    def references(self) -> set[str]:
        """Store hashes of the archive members that live in the store."""
        if self._stored is None:  # the run loop asks after every batch: once per archive
            self._stored = {r[len(STORE_PREFIX) :] for r in self.refs if r.startswith(STORE_PREFIX)}
        return set(self._stored)

    # -- state --------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "options": self.options.model_dump(),
            "seeds": self.seeds,
            "refs": self.refs,
            "recipes": self.recipes,
            "births": self.births,
            "scores_shape": list(self.scores.shape),
            "scores_b64": base64.b64encode(self.scores.astype("<f8").tobytes()).decode(),
            "task_names": self._task_names,
            "started": self._started,
            "binary": self._binary,
            "rng": self._rng.bit_generator.state,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        if state["options"] != self.options.model_dump() or state["seeds"] != self.seeds:
            raise StateError("m2n2: saved state was made with other options or seeds")
        self.refs = list(state["refs"])
        self.recipes = list(state["recipes"])
        self.births = [int(b) for b in state["births"]]
        shape = tuple(state["scores_shape"])
        raw = base64.b64decode(state["scores_b64"])
        self.scores = np.frombuffer(raw, dtype="<f8").reshape(shape).astype(np.float64)
        self._task_names = state["task_names"]
        self._started = int(state["started"])
        self._binary = bool(state["binary"])
        self._rng.bit_generator.state = state["rng"]
        self._stats, self._best, self._stored = None, None, None


@dataclass(frozen=True)
class _ArchiveStats:
    """What M2N2's steps need of its archive S, computed once per archive."""

    mode: str  # the capacity mode they were computed under
    sums: np.ndarray  # z_j = Σ_k S_kj
    capacity: np.ndarray  # c_j
    weights: np.ndarray  # c_j / (z_j^α + ε)
    fitness: np.ndarray  # f_k = Σ_j S_kj · weights_j


def _per_chromosome(names: list[str], values: list[float]) -> list[dict[str, Any]]:
    """Filter-list parameter value: one entry per chromosome ('' = the default entry)."""
    return [
        {"filter": n, "value": v} if n else {"value": v} for n, v in zip(names, values, strict=True)
    ]
