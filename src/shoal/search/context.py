"""Building the :class:`SearchContext` an algorithm is constructed with, and filling the
algorithm registry (every algorithm module is imported so ``ALGORITHMS`` is complete)."""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path
from typing import Any

from shoal.search.base import SearchContext

__all__ = ["ALGORITHM_MODULES", "build_context", "import_algorithms"]

#: modules that register algorithms (missing ones are skipped: parts being written)
ALGORITHM_MODULES = (
    "shoal.search.cmaes",
    "shoal.search.ps",
    "shoal.search.dfs",
    "shoal.search.m2n2",
    "shoal.search.cycleqd",
    "shoal.search.random_search",
)


def import_algorithms() -> None:
    """Import every module that registers an algorithm."""
    for name in ALGORITHM_MODULES:
        try:
            import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


def _layers(path: Path) -> int | None:
    from shoal.checkpoint import num_layers

    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    try:
        return num_layers(json.loads(cfg.read_text()))
    except (json.JSONDecodeError, OSError):
        return None


def _tensors(config: Any, models: dict[str, str]) -> dict[str, int]:
    if config.loader.type == "callable":
        from shoal.executors.loaders import load_resident

        module, _ = load_resident(config.loader.model_dump(), models, config.base_model)
        return {k: int(v.numel()) for k, v in module.state_dict().items()}
    first = config.base_model or next(iter(models), None)
    if first is None:
        return {}
    from shoal.checkpoint import open_checkpoint

    try:
        with open_checkpoint(models[first]) as reader:
            return {k: reader.numel(k) for k in reader}
    except Exception:  # cheap metadata only; an unreadable model errors later with context
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
    names: list[str] = []
    for i, spec in enumerate(config.tasks.fitness):
        names.append(str(spec.get("name") or _default_task_name(spec, i)))
    sizes = dict(task_sizes or {})
    if sizes:
        names = list(sizes)
    return SearchContext(
        models=dict(models),
        base_model=config.base_model,
        num_layers={k: _layers(Path(v)) for k, v in models.items()},
        tensors=_tensors(config, models),
        seed=seed,
        task_names=tuple(names),
        task_sizes=sizes,
        extra={"stage": stage} if stage else {},
    )


def _default_task_name(spec: dict[str, Any], i: int) -> str:
    if spec.get("type") == "testbed":
        return f"{spec.get('skill')}/{spec.get('split', 'train')}"
    if spec.get("type") == "jsonl":
        return Path(str(spec.get("path"))).stem
    return f"task{i}"
