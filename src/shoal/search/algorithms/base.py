"""The ask/tell contract every search algorithm keeps.

An algorithm is a state machine over recipes and numbers: :meth:`Algorithm.ask`
hands out recipes, :meth:`Algorithm.tell` takes their per-example scores in the
order they were asked. It never sees tensors, devices or evaluation code, so it
is tested on toy objectives without a model in sight.

Conventions (STYLE.md): higher is better; a failed or NaN evaluation counts as
the worst score; ``state_dict()`` returns plain data with a ``format_version``
and ``load_state_dict()`` validates it; all randomness comes from a seed given
at construction.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from shoal.errors import RecipeError, StateError
from shoal.tasks.base import Scores

#: prefix of a model reference that names an entry of the run's model store
STORE_PREFIX = "store:"


def store_key(recipe: Mapping[str, Any]) -> str:
    """Content key of the model a recipe builds: sha256 of its canonical JSON, 16 hex digits.

    The runner saves every merged candidate of an algorithm with
    :attr:`Algorithm.keep_models` under this key, so later recipes may name it as
    ``"store:" + store_key(recipe)`` (a seed, ``{"model": name}``, is named as it is).
    """
    text = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def store_ref(recipe: Mapping[str, Any]) -> str:
    """The model reference (``store:<key>``) of the model ``recipe`` builds."""
    return STORE_PREFIX + store_key(recipe)


def model_ref(recipe: Mapping[str, Any]) -> str:
    """How an archive names the model ``recipe`` builds: a plain ``{"model": name}`` (a
    seed) by that name, a merge by its :func:`store_ref` (the runner stores merges only)."""
    return store_ref(recipe) if "merge_method" in recipe else str(recipe["model"])


@dataclass(frozen=True)
class SearchContext:
    """What an algorithm may know about the run it is built for (no tensors, no devices).

    Attributes:
        models: Source model name -> path (as in the config; store models are not here).
        base_model: Name of the common ancestor, or ``None``.
        num_layers: Model name -> number of transformer blocks (``None`` if unknown).
        tensors: Tensor name -> number of elements of the first model, in checkpoint key order
            (empty if it could not be read cheaply, e.g. for a model built by a loader only).
        seed: Root seed of the run; derive every random stream from it.
        task_names: Names of the fitness tasks, in config order (the keys of each ``Scores``).
        task_sizes: Fitness task name -> number of examples.
        extra: Anything else the runner knows (e.g. ``{"stage": "ps"}``).
    """

    models: dict[str, str] = field(default_factory=dict)
    base_model: str | None = None
    num_layers: dict[str, int | None] = field(default_factory=dict)
    tensors: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    task_names: tuple[str, ...] = ()
    task_sizes: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class AlgorithmOptions(BaseModel):
    """Base of every algorithm's options schema: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def validate_options(schema: type[BaseModel], options: Mapping[str, Any], where: str) -> Any:
    """Validate ``options`` against ``schema``; errors become one :class:`RecipeError` line.

    Args:
        schema: The pydantic model of the options.
        options: Raw options from the config.
        where: Location prefix for messages, e.g. ``"algorithm"``.
    """
    try:
        return schema.model_validate(dict(options))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in (where, *err["loc"]))
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(schema.model_fields))
            raise RecipeError(f"{loc}: unknown option (known: {known})") from None
        raise RecipeError(f"{loc}: {err['msg'].removeprefix('Value error, ')}") from None


@dataclass(frozen=True)
class Best:
    """The best candidate seen so far.

    Attributes:
        recipe: The candidate's recipe, as a plain dict (mergekit-style YAML data).
        fitness: The scalar the algorithm ranks by (higher is better).
        evaluation: Index of the evaluation that produced it (0-based).
        extra: Anything else worth reporting (per-task means, genome, ...).
    """

    recipe: dict[str, Any]
    fitness: float
    evaluation: int
    extra: dict[str, Any] = field(default_factory=dict)


class Algorithm(abc.ABC):
    """Base class of ask/tell search algorithms.

    Subclasses implement :meth:`_ask`, :meth:`_tell`, :meth:`_state` and
    :meth:`_load_state`; this class keeps the bookkeeping that makes
    out-of-order calls an error with a clear message.
    """

    #: registry name ("cmaes-ps", "m2n2", ...)
    name: ClassVar[str] = ""
    format_version: ClassVar[int] = 1
    #: pydantic schema of the options :meth:`from_config` accepts
    Options: ClassVar[type[BaseModel]] = AlgorithmOptions
    #: save every merged candidate in the model store under :func:`store_key` (M2N2)
    keep_models: ClassVar[bool] = False
    #: its recipes combine tensors of one name across models, so the models must agree on
    #: every shape (False for layer stacking, which takes embeddings and head from one model)
    tensorwise: ClassVar[bool] = True

    @classmethod
    def from_config(cls, options: Mapping[str, Any], context: SearchContext) -> Algorithm:
        """Build the algorithm from config options (validated by :attr:`Options`) and context.

        The default calls ``cls(options=<validated Options>, context=context)``; override it
        when the constructor differs.

        Raises:
            RecipeError: Unknown option key or bad value, naming ``algorithm.<key>``.
        """
        opts = validate_options(cls.Options, options, "algorithm")
        return cls(options=opts, context=context)  # type: ignore[call-arg]

    @classmethod
    def check_block(
        cls,
        options: BaseModel,
        *,
        models: Sequence[str],
        task_names: Sequence[str],
        base_model: str | None,
    ) -> None:
        """Check validated options against the run without loading a model (default: none).

        The pre-run check calls it for every stage with the models known there (the config's
        and earlier stages'), so a later stage's mistake ends the run before the first stage
        spends its budget. Errors name ``algorithm.<key>`` as :meth:`from_config` does.

        Raises:
            RecipeError: An option that does not fit the run.
        """
        return  # most algorithms' options are checked whole by their schema

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None
        self.evaluations = 0

    # -- public API ---------------------------------------------------------------------------
    def ask(self, n: int | None = None) -> list[dict[str, Any]]:
        """Return ``n`` recipes to evaluate (``None``: the algorithm's natural batch size).

        Raises:
            StateError: if the previous batch has not been told yet.
        """
        if self._pending is not None:
            raise StateError(
                f"{self.name}: ask() called twice; tell() the scores of the "
                f"{len(self._pending)} recipes handed out before asking again"
            )
        recipes = self._ask(n)
        self._pending = recipes
        return recipes

    def tell(self, recipes: Sequence[dict[str, Any]], scores: Sequence[Scores]) -> None:
        """Report the scores of the recipes from the last :meth:`ask`, in the same order.

        A candidate that failed to build or score is told as NaN on every example: it
        counts as the worst, and it has no model an algorithm could keep.
        """
        if self._pending is None:
            raise StateError(f"{self.name}: tell() without ask(); call ask() first")
        if len(recipes) != len(self._pending) or len(scores) != len(recipes):
            raise StateError(
                f"{self.name}: tell() got {len(recipes)} recipes and {len(scores)} scores "
                f"for {len(self._pending)} asked"
            )
        if list(recipes) != self._pending:
            raise StateError(f"{self.name}: tell() recipes differ from those asked (order matters)")
        self._pending = None
        self._tell(list(recipes), list(scores))
        self.evaluations += len(recipes)

    @property
    def awaiting_tell(self) -> bool:
        """Whether a batch was asked and not told yet."""
        return self._pending is not None

    def stop(self) -> list[str]:
        """Reasons to stop that come from the algorithm itself (empty: keep going)."""
        return []

    @property
    @abc.abstractmethod
    def best(self) -> Best | None:
        """Best candidate so far, ``None`` before the first tell."""

    def specialists(self) -> dict[str, Best]:
        """Named candidates besides :attr:`best` that the run's summary scores on every
        split (CycleQD: the best elite of each archive); default none."""
        return {}

    def references(self) -> set[str]:
        """Store keys (content hashes) of models the algorithm still needs, as a new set the
        caller may change; default none."""
        return set()

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (JSON-able except for pycma's own bytes), resumable exactly."""
        if self._pending is not None:
            raise StateError(f"{self.name}: state_dict() between ask() and tell()")
        return {
            "algorithm": self.name,
            "format_version": self.format_version,
            "evaluations": self.evaluations,
            "state": self._state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; raises :class:`StateError` if it does not fit."""
        if state.get("algorithm") != self.name:
            raise StateError(f"saved state is for {state.get('algorithm')!r}, not {self.name!r}")
        if state.get("format_version") != self.format_version:
            raise StateError(
                f"{self.name}: saved state has format_version {state.get('format_version')}, "
                f"this version reads {self.format_version}"
            )
        self._pending = None
        self.evaluations = int(state["evaluations"])
        self._load_state(state["state"])

    # -- to implement -------------------------------------------------------------------------
    @abc.abstractmethod
    def _ask(self, n: int | None) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def _tell(self, recipes: list[dict[str, Any]], scores: list[Scores]) -> None: ...

    @abc.abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def _load_state(self, state: dict[str, Any]) -> None: ...


#: name -> algorithm class; filled by :func:`register`
ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator adding an algorithm to :data:`ALGORITHMS` under ``cls.name``."""
    if not cls.name or cls.name in ALGORITHMS:
        raise ValueError(f"algorithm name {cls.name!r} is empty or taken")
    ALGORITHMS[cls.name] = cls
    return cls


ScoreReducer = Callable[[Scores], float]


def mean_over_tasks(scores: Scores) -> float:
    """Fitness used by mean-based algorithms: the mean over tasks of each task's mean score;
    ``-inf``, the worst, for a candidate told as failed (NaN scores) or with no scores."""
    if not scores:
        return float("-inf")
    means = [float(v.mean()) if len(v) else 0.0 for v in scores.values()]
    f = sum(means) / len(means)
    return f if math.isfinite(f) else float("-inf")


def choose_index(rng: np.random.Generator, weights: np.ndarray) -> int:
    """Index drawn ∝ ``weights`` (non-negative, positive sum) with one uniform of ``rng``.

    The one draw makes runs that share a generator (M2N2's and CycleQD's parent choice)
    consume it identically, whatever the weights.
    """
    cdf = np.cumsum(weights)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))
