"""CMA-ES (Hansen & Ostermeier, 2001) as a thin, seeded ask/tell wrapper over pycma.

Two layers live here:

* :class:`CMAES` — a generic maximiser of a black-box function of a real vector,
  usable on toy objectives. It owns one ``cma.CMAEvolutionStrategy`` whose random
  source is *injected* (a picklable callable around a ``numpy.random.Generator``
  derived from the seed), so pycma never touches numpy's global RNG and a run is
  a function of its seed. Higher is better outside; the sign flips only inside.
  A NaN or failed value counts as the worst of its generation.
* :class:`GenomeCMAES` — the base of the evolutionary-merge algorithms (PS, DFS): an
  :class:`~shoal.search.algorithms.base.Algorithm` whose candidates are CMA-ES vectors
  decoded into recipes by a subclass, ranked by the mean over tasks.

State: pycma's own pickled bytes (base64 in the JSON state) — the one pickle
STYLE.md allows — plus our counters and the best-so-far.
"""

from __future__ import annotations

import base64
import math
import pickle
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from shoal.errors import StateError
from shoal.search.algorithms.base import Algorithm, Best, mean_over_tasks
from shoal.tasks.base import Scores

__all__ = ["CMAES", "GenomeCMAES", "default_popsize"]


def default_popsize(n: int) -> int:
    """Population size 4 + ⌊3 ln n⌋ (Hansen's default; METHODS.md §2)."""
    return 4 + math.floor(3.0 * math.log(max(n, 1)))


class _Gaussian:
    """pycma's ``randn`` option: standard normals from an explicit generator.

    pycma calls ``randn(lam, n)``; a module-level class (not a lambda) so that
    pycma's state pickles with it, generator state included.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(np.random.SeedSequence(seed))

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class CMAES:
    """Seeded CMA-ES maximiser with ask/tell over numpy vectors.

    Args:
        x0: Initial mean, shape ``(n,)``.
        sigma0: Initial step size.
        seed: Root seed of the sampling generator (runs are reproducible from it).
        popsize: Population λ; default 4 + ⌊3 ln n⌋.
        bounds: ``(lower, upper)``, each a scalar, ``None`` or a length-``n`` sequence
            (entries may be ``None``); handled by pycma's ``BoundTransform``, so every
            asked vector lies inside the box.
        stds: Per-coordinate multipliers of ``sigma0`` (pycma ``CMA_stds``).
        options: Further pycma options (e.g. ``{"tolflatfitness": 20}``).
    """

    def __init__(
        self,
        x0: Sequence[float] | np.ndarray,
        sigma0: float,
        *,
        seed: int,
        popsize: int | None = None,
        bounds: tuple[Any, Any] | None = None,
        stds: Sequence[float] | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        import cma  # local: keeps `import shoal.search` light

        x0 = np.asarray(x0, dtype=np.float64).reshape(-1)
        if x0.size < 1:
            raise ValueError("CMAES needs at least one dimension")
        self.n = int(x0.size)
        self.popsize = int(popsize or default_popsize(self.n))
        opts: dict[str, Any] = {
            "popsize": self.popsize,
            "seed": float("nan"),  # nan: pycma must not seed numpy's global RNG
            "randn": _Gaussian(seed),
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
            "verb_filenameprefix": "",
            # accuracies on a few dozen items are often tied: pycma would call a generation
            # of equal values converged (tolfun) and end the run before its budget
            "tolflatfitness": 20,
            "tolfun": 0,
            "tolfunhist": 0,
        }
        if bounds is not None:
            opts["bounds"] = [_bound(b) for b in bounds]
        if stds is not None:
            opts["CMA_stds"] = [float(s) for s in stds]
        known = cma.CMAOptions()  # pycma takes any case and unique prefixes of its keys
        unknown = sorted(k for k in options or {} if known.corrected_key(k) is None)
        if unknown:
            raise ValueError(f"cma_options: unknown pycma option(s) {', '.join(unknown)}")
        opts.update({known.corrected_key(k): v for k, v in (options or {}).items()})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._es = cma.CMAEvolutionStrategy(x0.tolist(), float(sigma0), opts)
        self.generation = 0
        self.evaluations = 0
        self.best_x: np.ndarray | None = None
        self.best_fitness = -math.inf

    def ask(self) -> np.ndarray:
        """Sample one generation, shape ``(popsize, n)`` (inside the bounds)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xs = self._es.ask()
        return np.asarray(xs, dtype=np.float64)

    def tell(self, xs: np.ndarray | Sequence[Sequence[float]], fitness: Sequence[float]) -> None:
        """Update from the asked vectors and their fitness (higher is better).

        NaN/inf values count as the worst: below every finite value of the batch.
        """
        xs = np.asarray(xs, dtype=np.float64)
        f = np.asarray(fitness, dtype=np.float64).reshape(-1)
        if xs.shape[0] != f.size:
            raise StateError(f"cmaes: tell() got {xs.shape[0]} vectors and {f.size} values")
        finite = np.isfinite(f)
        for x, v in zip(xs[finite], f[finite], strict=True):  # a failed vector is no best
            if v > self.best_fitness:
                self.best_fitness, self.best_x = float(v), x.copy()
        worst = float(f[finite].min()) - 1.0 - abs(float(f[finite].min())) if finite.any() else 0.0
        f = np.where(finite, f, worst)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._es.tell([x for x in xs], (-f).tolist())  # pycma minimises
        self.generation += 1
        self.evaluations += int(f.size)

    @property
    def mean(self) -> np.ndarray:
        """Current distribution mean (in the bounded, user-facing coordinates)."""
        es = self._es
        return np.asarray(
            es.gp.pheno(es.mean, into_bounds=es.boundary_handler.repair), dtype=np.float64
        )

    @property
    def sigma(self) -> float:
        """Current overall step size."""
        return float(self._es.sigma)

    def stop(self) -> list[str]:
        """pycma's termination reasons (empty: keep going)."""
        return sorted(str(k) for k in self._es.stop())

    def state_dict(self) -> dict[str, Any]:
        """Plain data: pycma's pickled bytes as base64, counters, best so far."""
        return {
            "es": base64.b64encode(pickle.dumps(self._es)).decode("ascii"),
            "generation": self.generation,
            "evaluations": self.evaluations,
            "best_x": None if self.best_x is None else self.best_x.tolist(),
            "best_fitness": self.best_fitness if math.isfinite(self.best_fitness) else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the run continues exactly as it would have."""
        try:
            es = pickle.loads(base64.b64decode(state["es"]))  # pycma's own state (STYLE.md)
        except Exception as exc:  # corrupt or foreign bytes
            raise StateError(f"cmaes: saved pycma state does not load: {exc}") from exc
        if int(es.N) != self.n:
            raise StateError(f"cmaes: saved state has {es.N} dimensions, this search has {self.n}")
        _file_again(es)
        self._es = es
        self.generation = int(state["generation"])
        self.evaluations = int(state["evaluations"])
        bx = state.get("best_x")
        self.best_x = None if bx is None else np.asarray(bx, dtype=np.float64)
        bf = state.get("best_fitness")
        self.best_fitness = -math.inf if bf is None else float(bf)


def _file_again(es: Any) -> None:
    """File pycma's archives of asked solutions under this process's keys.

    pycma keys a solution by Python's ``hash`` of its bytes, which differs from process to
    process (``PYTHONHASHSEED``). In a state unpickled by a resumed run the generation
    asked before the kill would no longer be found when it is told, and pycma would update
    as if it were foreign: the run would leave the uninterrupted one's path. Written by
    hand because pycma offers no re-keying; each archive keeps the solution itself beside
    its key (``_unhashed_keys``), so the new key is computed the way pycma computes it.
    """
    from cma.utilities.utils import SolutionDict

    rounding = getattr(es, "_round_integer_variables", None)  # with integer_variables
    for archive in [*vars(es).values(), getattr(rounding, "archive", None)]:
        if not isinstance(archive, SolutionDict):
            continue
        new = {old: archive.key(x) for old, x in archive._unhashed_keys.items()}
        archive.data = type(archive.data)((new.get(k, k), v) for k, v in archive.data.items())
        archive.data_with_same_key = {
            new.get(k, k): v for k, v in archive.data_with_same_key.items()
        }
        archive._unhashed_keys = {new[k]: x for k, x in archive._unhashed_keys.items()}


def _bound(b: Any) -> Any:
    if b is None or isinstance(b, int | float):
        return b
    return [None if v is None else float(v) for v in b]


class GenomeCMAES(Algorithm):
    """Ask/tell algorithm whose candidates are CMA-ES vectors decoded into recipes.

    Subclasses set up :attr:`es` (a :class:`CMAES`) and implement :meth:`decode`.
    Fitness is :func:`~shoal.search.algorithms.base.mean_over_tasks` of a candidate's scores.

    ``ask(n)`` hands out at most ``n`` candidates of the current generation and
    never crosses a generation boundary (the ES is told once a whole generation
    has scores); ``ask(None)`` hands out the rest of the generation.

    A subclass that sets :attr:`start` has that vector scored first, alone, before the
    first generation: it competes for :attr:`best` but is not told to the ES, whose
    samples stay what they would be without it. DFS does this so that its result is
    never below the model it starts from (model A, e.g. the PS stage before it).
    """

    es: CMAES
    #: a genome scored once before the first generation (``None``: none)
    start: np.ndarray | None = None

    def __init__(self) -> None:
        super().__init__()
        self._gen_x: list[list[float]] = []  # the current generation's vectors
        self._gen_f: list[float] = []  # fitness of the first len(_gen_f) of them
        self._best: Best | None = None
        self._start_scored = False

    # -- to implement ---------------------------------------------------------------------
    def decode(self, x: np.ndarray) -> dict[str, Any]:
        """The recipe a vector stands for."""
        raise NotImplementedError

    def describe(self, x: np.ndarray) -> dict[str, Any]:
        """Readable genome for reports (``Best.extra["genome"]``); default the raw vector."""
        return {"x": [float(v) for v in x]}

    # -- Algorithm --------------------------------------------------------------------------
    def _ask(self, n: int | None) -> list[dict[str, Any]]:
        if self._start_due:
            return [self.decode(self.start)]  # type: ignore[arg-type]
        if not self._gen_x:
            self._gen_x = self.es.ask().tolist()
            self._gen_f = []
        start = len(self._gen_f)
        stop = len(self._gen_x) if n is None else min(len(self._gen_x), start + max(int(n), 1))
        return [self.decode(np.asarray(x)) for x in self._gen_x[start:stop]]

    @property
    def _start_due(self) -> bool:
        return self.start is not None and not self._start_scored

    def _tell(self, recipes: list[dict[str, Any]], scores: list[Scores]) -> None:
        if self._start_due:
            self._consider(np.asarray(self.start), recipes[0], scores[0], self.evaluations)
            self._start_scored = True
            return
        start = len(self._gen_f)
        for i, s in enumerate(scores):
            f = self._consider(
                np.asarray(self._gen_x[start + i]), recipes[i], s, self.evaluations + i
            )
            self._gen_f.append(f)
        if len(self._gen_f) == len(self._gen_x):
            self.es.tell(np.asarray(self._gen_x), self._gen_f)  # -inf: the worst
            self._gen_x, self._gen_f = [], []

    def _consider(
        self, x: np.ndarray, recipe: dict[str, Any], scores: Scores, evaluation: int
    ) -> float:
        """The fitness of one scored genome; it becomes :attr:`best` if it beats it (a
        failed one, -inf, never does)."""
        f = mean_over_tasks(scores)
        if math.isfinite(f) and (self._best is None or f > self._best.fitness):
            means = {k: float(np.mean(v)) if len(v) else 0.0 for k, v in scores.items()}
            self._best = Best(
                recipe=recipe,
                fitness=f,
                evaluation=evaluation,
                extra={"task_means": means, "genome": self.describe(x)},
            )
        return f

    def stop(self) -> list[str]:
        """pycma's termination reasons, checked between generations."""
        return [] if self._gen_x else self.es.stop()

    @property
    def best(self) -> Best | None:
        """Best candidate on the fitness tasks so far."""
        return self._best

    @property
    def popsize(self) -> int:
        """CMA-ES population size λ (the natural batch)."""
        return self.es.popsize

    def _state(self) -> dict[str, Any]:
        best = None
        if self._best is not None:
            b = self._best
            best = {
                "recipe": b.recipe,
                "fitness": b.fitness,
                "evaluation": b.evaluation,
                "extra": b.extra,
            }
        return {
            "es": self.es.state_dict(),
            "gen_x": self._gen_x,
            "gen_f": [f if math.isfinite(f) else None for f in self._gen_f],
            "best": best,
            "start_scored": self._start_scored,
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        try:
            self.es.load_state_dict(state["es"])
            self._gen_x = [list(map(float, x)) for x in state["gen_x"]]
            self._gen_f = [-math.inf if f is None else float(f) for f in state["gen_f"]]
            b = state["best"]
            # a state saved before starts were scored goes on without scoring one
            self._start_scored = bool(state.get("start_scored", True))
        except (KeyError, TypeError) as exc:
            raise StateError(f"{self.name}: saved state is missing {exc}") from exc
        self._best = (
            None if b is None else Best(b["recipe"], b["fitness"], b["evaluation"], b["extra"])
        )
