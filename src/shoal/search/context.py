"""Building the :class:`SearchContext` an algorithm is constructed with, filling the
algorithm registry (every algorithm module is imported so ``ALGORITHMS`` is complete), and
constructing an algorithm from its config block."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from shoal.errors import RecipeError, ShoalError
from shoal.search.algorithms.base import ALGORITHMS, Algorithm, SearchContext

if TYPE_CHECKING:
    from shoal.search.config import RunConfig

__all__ = [
    "ALGORITHM_MODULES",
    "algorithm_class",
    "algorithm_key",
    "build_context",
    "callable_resident",
    "forget_callable_residents",
    "import_algorithms",
    "make_algorithm",
    "prefix_error",
]

#: modules that register algorithms (missing ones are skipped: parts being written)
ALGORITHM_MODULES = (
    "shoal.search.algorithms.cmaes",
    "shoal.search.algorithms.ps",
    "shoal.search.algorithms.dfs",
    "shoal.search.algorithms.m2n2",
    "shoal.search.algorithms.cycleqd",
    "shoal.search.random_search",
)

E = TypeVar("E", bound=ShoalError)


def import_algorithms() -> None:
    """Import every module that registers an algorithm."""
    for name in ALGORITHM_MODULES:
        try:
            import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


def prefix_error(exc: E, where: str) -> E:
    """``exc`` with ``where: `` in front of its message, unless it names ``where`` already."""
    text = str(exc)
    if text.startswith((f"{where}:", f"{where}.", f"{where}[")):
        return exc
    return type(exc)(f"{where}: {text}")


def algorithm_key(config: RunConfig, index: int) -> str:
    """Config key of the algorithm block of stage ``index``, for messages."""
    return "algorithm" if config.stages is None else f"stages[{index}].algorithm"


def algorithm_class(name: str, where: str = "algorithm") -> type[Algorithm]:
    """The registered algorithm called ``name``.

    Raises:
        RecipeError: Unknown name, naming ``<where>.name`` and the known ones.
    """
    import_algorithms()
    if name not in ALGORITHMS:
        known = ", ".join(sorted(ALGORITHMS)) or "none registered"
        raise RecipeError(f"{where}.name: unknown algorithm {name!r} (known: {known})")
    return ALGORITHMS[name]


def make_algorithm(
    config: RunConfig,
    block: Mapping[str, Any],
    models: dict[str, str],
    seed: int,
    task_sizes: dict[str, int] | None = None,
    *,
    label: str | None = None,
    where: str = "algorithm",
) -> Algorithm:
    """Construct the algorithm of one block (``name`` plus options) for a stage.

    Raises:
        RecipeError: Unknown name, option or bad value, naming ``<where>.<key>``.
    """
    options = dict(block)
    cls = algorithm_class(str(options.pop("name")), where)
    context = build_context(config, models, seed, task_sizes, stage=label)
    with options_named_at(where):
        return cls.from_config(options, context)


@contextmanager
def options_named_at(where: str) -> Iterator[None]:
    r"""Errors raised inside name ``where`` (``stages[1].algorithm``) for ``algorithm``.

    Algorithms name their options ``algorithm.<key>``; a stage's block lives elsewhere.
    Options that pass their types but not the method (``ValueError``, ``TypeError``) become
    one-line :class:`RecipeError`\ s naming ``where``.
    """
    try:
        yield
    except RecipeError as exc:
        text = str(exc)
        if where == "algorithm" or not text.startswith("algorithm."):
            raise
        raise RecipeError(where + text[len("algorithm") :]) from None
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{where}: {' '.join(str(exc).split())}") from None


def _layers(path: Path) -> int | None:
    from shoal.checkpoint import num_layers

    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    try:
        return num_layers(json.loads(cfg.read_text()))
    except (json.JSONDecodeError, OSError):
        return None


@functools.lru_cache(maxsize=4)
def _callable_resident(loader: str, models: str, base_model: str | None) -> Any:
    from shoal.executors.loaders import load_resident

    module, tokenizer = load_resident(json.loads(loader), json.loads(models), base_model)
    return {k: int(v.numel()) for k, v in module.state_dict().items()}, tokenizer


def callable_resident(config: Any, models: dict[str, str]) -> tuple[dict[str, int], Any]:
    """Tensor sizes and tokenizer of the model a ``callable`` loader builds.

    Built once per spec until :func:`forget_callable_residents` (which every run's checks
    call first), so a run's checks and its algorithm context share one build; the module
    itself is not kept.
    """
    spec = json.dumps(config.loader.model_dump(mode="json"), sort_keys=True)
    sizes, tokenizer = _callable_resident(
        spec, json.dumps(models, sort_keys=True), config.base_model
    )
    return dict(sizes), tokenizer


def forget_callable_residents() -> None:
    """Drop what :func:`callable_resident` remembers (the models may have changed)."""
    _callable_resident.cache_clear()


def _tensors(config: Any, models: dict[str, str]) -> dict[str, int]:
    if config.loader.type == "callable":
        return callable_resident(config, models)[0]
    first = config.base_model or next(iter(models), None)
    if first is None:
        return {}
    from shoal.checkpoint import open_checkpoint

    try:
        with open_checkpoint(models[first]) as reader:
            return {k: reader.numel(k) for k in reader}
    except Exception:  # check_run read the headers; a later stage's model may not exist yet
        return {}


def build_context(
    config: Any,
    models: dict[str, str],
    seed: int,
    task_sizes: dict[str, int] | None = None,
    *,
    stage: str | None = None,
) -> SearchContext:
    """The context of one stage: models, layer counts, tensor sizes, seed, tasks."""
    sizes = dict(task_sizes or {})
    return SearchContext(
        models=dict(models),
        base_model=config.base_model,
        num_layers={k: _layers(Path(v)) for k, v in models.items()},
        tensors=_tensors(config, models),
        seed=seed,
        task_names=tuple(sizes),
        task_sizes=sizes,
        extra={"stage": stage} if stage else {},
    )
