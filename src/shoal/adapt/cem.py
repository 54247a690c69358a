"""The cross-entropy method for Transformer²'s few-shot mixing weights (METHODS.md §5).

Two-pass inference in its few-shot form looks for weights α with which the mixture of K
experts, z′ = Σ_k α_k z_k (:func:`~shoal.adapt.expert.mix_z`), scores best on a few
examples of the target task. The search is the cross-entropy method (Rubinstein, 1999):

1. draw a population of α ~ N(μ, diag(s²)), clamped to [0, 1];
2. score each (the caller builds z′, runs the examples and reports the score, plus the
   mean log-likelihood of the correct answers as a second number);
3. keep the elites, the best ``elite_ratio`` of the population ranked by score and, among
   equal scores, by the second number (few examples make ties common);
4. μ ← mean of the elites, s ← their standard deviation; repeat (50–100 iterations).

Defaults are METHODS.md §5's: population 32, elite ratio 0.2 (⌊32·0.2⌋ = 6 elites),
μ₀ = 1/K, s₀ = 0.5. α has K numbers per model, or K·M per matrix (expert-major, the flat
layout :func:`~shoal.adapt.expert.mix_z` reads).

The object follows the search algorithms' ask/tell habits: explicit state, a seeded
``np.random.Generator``, higher is better, NaN counts as the worst, ``state_dict()`` is
plain data with a ``format_version``. It touches no model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.errors import StateError

__all__ = ["CEM", "CEMBest"]


@dataclass(frozen=True)
class CEMBest:
    """The best α told so far.

    Attributes:
        alpha: ``(dim,)`` the weights, in [0, 1].
        score: Its score.
        tie_break: Its second number (mean log-likelihood), −inf if none was told.
        iteration: The iteration (0-based) it was asked in.
    """

    alpha: np.ndarray
    score: float
    tie_break: float
    iteration: int


def _finite_or_worst(values: np.ndarray) -> np.ndarray:
    out = values.astype(float).copy()
    out[~np.isfinite(out)] = -math.inf
    return out


class CEM:
    """Cross-entropy method over α ∈ [0, 1]^dim, dim = K (per model) or K·M (per matrix).

    Args:
        num_experts: K; the initial mean is 1/K.
        num_matrices: M for per-matrix weights (1: per model).
        population: Candidates per :meth:`ask`.
        elite_ratio: Share of the population kept as elites (at least one).
        init_std: Initial standard deviation of every coordinate.
        seed: Seed of the ``np.random.Generator``.
        min_std: Floor on the standard deviation after each update (0: none).

    Raises:
        StateError: An option out of range.
    """

    name = "cem"
    format_version = 1

    def __init__(
        self,
        num_experts: int,
        *,
        num_matrices: int = 1,
        population: int = 32,
        elite_ratio: float = 0.2,
        init_std: float = 0.5,
        seed: int = 0,
        min_std: float = 0.0,
    ) -> None:
        if num_experts < 1 or num_matrices < 1:
            raise StateError(
                f"cem: need at least one expert and matrix, got {num_experts}, {num_matrices}"
            )
        if population < 2:
            raise StateError(f"cem: population {population}; it needs at least 2")
        if not 0.0 < elite_ratio <= 1.0:
            raise StateError(f"cem: elite_ratio {elite_ratio} is not in (0, 1]")
        if not init_std > 0.0 or min_std < 0.0:
            raise StateError(f"cem: init_std {init_std} must be > 0 and min_std {min_std} >= 0")
        self.num_experts = num_experts
        self.num_matrices = num_matrices
        self.dim = num_experts * num_matrices
        self.population = population
        self.elite_ratio = elite_ratio
        self.num_elites = max(1, int(population * elite_ratio))
        self.init_std = init_std
        self.min_std = min_std
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.mean = np.full(self.dim, 1.0 / num_experts)
        self.std = np.full(self.dim, float(init_std))
        self.iteration = 0
        self._pending: np.ndarray | None = None
        self._best: CEMBest | None = None

    # -- ask / tell -------------------------------------------------------------------------
    def ask(self) -> np.ndarray:
        """Draw the next population.

        Returns:
            ``(population, dim)`` float64 array of α, each clamped to [0, 1].

        Raises:
            StateError: The previous population has not been told yet.
        """
        if self._pending is not None:
            raise StateError("cem: ask() again before tell(); tell the scores of the last ask")
        noise = self._rng.standard_normal((self.population, self.dim))
        alpha = np.clip(self.mean + self.std * noise, 0.0, 1.0)
        self._pending = alpha
        return alpha.copy()

    def tell(
        self,
        scores: Sequence[float] | np.ndarray,
        tie_breaks: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        """Report the scores of the last :meth:`ask`, in its order, and update μ and s.

        Ranking is by score, then by ``tie_breaks`` (higher is better for both), then by
        the order asked. NaN or ±inf counts as the worst value.

        Args:
            scores: ``(population,)`` scores.
            tie_breaks: ``(population,)`` second numbers (the mean log-likelihood of the
                correct answers), or ``None``.

        Raises:
            StateError: No pending :meth:`ask`, or arrays of the wrong length.
        """
        if self._pending is None:
            raise StateError("cem: tell() without ask(); ask for a population first")
        s = _finite_or_worst(np.asarray(scores, dtype=float).reshape(-1))
        if s.shape != (self.population,):
            raise StateError(f"cem: tell() got {s.size} scores for {self.population} candidates")
        if tie_breaks is None:
            t = np.full(self.population, -math.inf)
        else:
            t = _finite_or_worst(np.asarray(tie_breaks, dtype=float).reshape(-1))
            if t.shape != (self.population,):
                raise StateError(
                    f"cem: tell() got {t.size} tie breaks for {self.population} candidates"
                )
        alpha = self._pending
        # np.lexsort sorts by its last key first; negate for descending, index keeps it stable
        order = np.lexsort((np.arange(self.population), -t, -s))
        elites = alpha[order[: self.num_elites]]
        self.mean = elites.mean(axis=0)
        self.std = np.maximum(elites.std(axis=0), self.min_std)
        top = int(order[0])
        best = self._best
        if best is None or (s[top], t[top]) > (best.score, best.tie_break):
            self._best = CEMBest(alpha[top].copy(), float(s[top]), float(t[top]), self.iteration)
        self._pending = None
        self.iteration += 1

    @property
    def best(self) -> CEMBest | None:
        """The best α told so far (``None`` before the first :meth:`tell`)."""
        return self._best

    # -- state ------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {
            "num_experts": self.num_experts,
            "num_matrices": self.num_matrices,
            "population": self.population,
            "elite_ratio": self.elite_ratio,
            "init_std": self.init_std,
            "min_std": self.min_std,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain-data (JSON-able) state; loading it continues the run exactly.

        Raises:
            StateError: Between :meth:`ask` and :meth:`tell`.
        """
        if self._pending is not None:
            raise StateError("cem: state_dict() between ask() and tell()")
        best = self._best
        return {
            "algorithm": self.name,
            "format_version": self.format_version,
            "config": self._config(),
            "iteration": self.iteration,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "rng": self._rng.bit_generator.state,
            "best": None
            if best is None
            else {
                "alpha": best.alpha.tolist(),
                "score": best.score,
                "tie_break": best.tie_break,
                "iteration": best.iteration,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        The saved state wins over this object's ``seed``, ``init_std`` and ``min_std``;
        the number of experts and matrices, the population and the elite ratio must match.

        Raises:
            StateError: Another algorithm, another format version, or another search shape.
        """
        if state.get("algorithm") != self.name:
            raise StateError(f"saved state is for {state.get('algorithm')!r}, not 'cem'")
        if state.get("format_version") != self.format_version:
            raise StateError(
                f"cem: saved state has format_version {state.get('format_version')}, "
                f"this version reads {self.format_version}"
            )
        saved = dict(state.get("config") or {})
        # the shape of the search must match; the rest is taken from the saved state
        for key in ("num_experts", "num_matrices", "population", "elite_ratio"):
            if saved.get(key) != getattr(self, key):
                raise StateError(
                    f"cem: saved state has {key} {saved.get(key)!r}, this CEM has "
                    f"{getattr(self, key)!r}"
                )
        self.init_std = float(saved["init_std"])
        self.min_std = float(saved["min_std"])
        self.seed = int(saved["seed"])
        self.iteration = int(state["iteration"])
        self.mean = np.asarray(state["mean"], dtype=float)
        self.std = np.asarray(state["std"], dtype=float)
        self._rng.bit_generator.state = state["rng"]
        b = state["best"]
        self._best = (
            None
            if b is None
            else CEMBest(
                np.asarray(b["alpha"], dtype=float),
                float(b["score"]),
                float(b["tie_break"]),
                int(b["iteration"]),
            )
        )
        self._pending = None
