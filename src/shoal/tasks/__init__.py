"""shoal.tasks — scoring a model, one number per example.

A :class:`Task` has a ``name``, a length and ``score(model)``, which returns a float64
array in [0, 1] with one entry per example — never only the mean, since M2N2's resource
competition and CycleQD's behaviour grids need the examples (:func:`check_scores`
enforces the shape and turns NaN into 0). Task types live in a registry shared by run
configs and the CLI:

- :data:`TASK_TYPES`, :func:`register_task_type`, :func:`build_task`,
  :func:`validate_task_spec`, :class:`TaskEnv` (``registry.py``)
- built-in types: ``jsonl`` (greedy generation with exact match, or multiple choice by
  log-likelihood), ``python`` and ``function`` (your own callable), ``lm-eval``,
  ``image-generation`` (a diffusion U-Net's images scored by a classifier,
  ``image_generation.py``), ``vqa``
  (exact match on image-question-answer triples, :class:`VQATask`)
- the scorers behind them: :class:`GenerationTask`, :class:`ChoiceTask`,
  :class:`ClassificationTask`

The ``testbed`` task type is registered one layer up (``shoal.executors.testbed_task``).
Names are imported lazily, so reading the registry does not load torch or transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# public name -> defining module
_LAZY = {
    "ChoiceTask": "shoal.tasks.choice",
    "ClassificationTask": "shoal.tasks.classification",
    "GenerationTask": "shoal.tasks.generation",
    "TASK_TYPES": "shoal.tasks.registry",
    "Task": "shoal.tasks.base",
    "TaskEnv": "shoal.tasks.registry",
    "VQATask": "shoal.tasks.vqa",
    "build_task": "shoal.tasks.registry",
    "check_scores": "shoal.tasks.base",
    "register_task_type": "shoal.tasks.registry",
    "validate_task_spec": "shoal.tasks.registry",
}

__all__ = [
    "TASK_TYPES",
    "ChoiceTask",
    "ClassificationTask",
    "GenerationTask",
    "Task",
    "TaskEnv",
    "VQATask",
    "build_task",
    "check_scores",
    "register_task_type",
    "validate_task_spec",
]

if TYPE_CHECKING:  # pragma: no cover
    from shoal.tasks.base import Task, check_scores
    from shoal.tasks.choice import ChoiceTask
    from shoal.tasks.classification import ClassificationTask
    from shoal.tasks.generation import GenerationTask
    from shoal.tasks.registry import (
        TASK_TYPES,
        TaskEnv,
        build_task,
        register_task_type,
        validate_task_spec,
    )
    from shoal.tasks.vqa import VQATask


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shoal.tasks' has no attribute {name!r}")
