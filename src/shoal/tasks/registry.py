"""Task types by name, so a config can say ``type: jsonl`` and get a :class:`Task`.

Each type has a pydantic schema of its fields (unknown keys are errors) and a builder
``(options, env) -> Task``. Built in: ``jsonl`` (exact match by generation, or multiple
choice by log-likelihood when the rows hold choices), ``python`` (a factory
``module:function`` returning a Task), ``function`` (``module:function`` scoring a model),
``lm-eval`` (a local lm-evaluation-harness task), ``image-generation`` (a diffusion
U-Net's images scored by a classifier), ``vqa`` (exact match on image-question-answer
triples). Parts above ``tasks`` add their own
(``testbed`` is registered by :mod:`shoal.executors.testbed_task`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from shoal.errors import TaskError
from shoal.tasks.base import Task

__all__ = [
    "TASK_TYPES",
    "TaskEnv",
    "TaskOptions",
    "add_task",
    "build_task",
    "register_task_type",
    "validate_task_spec",
]

_BUILTIN_MODULES = (
    "shoal.tasks.jsonl",
    "shoal.tasks.python",
    "shoal.tasks.lm_eval_task",
    "shoal.tasks.vqa",
    "shoal.tasks.image_generation",
)


@dataclass
class TaskEnv:
    """What a task builder may use from the worker that builds it.

    Attributes:
        tokenizer: The resident model's tokenizer (``None`` for non-LM models).
        root: Directory relative paths are resolved against.
        device: Torch device of the model.
    """

    tokenizer: Any = None
    root: str | None = None
    device: str = "cpu"

    def resolve(self, path: str) -> Path:
        """``path`` made absolute against :attr:`root`."""
        p = Path(path).expanduser()
        return p if p.is_absolute() or self.root is None else Path(self.root) / p

    def get_tokenizer(self, path: str | None) -> Any:
        """The tokenizer at ``path`` (a model dir) or, if ``None``, the worker's."""
        if path is None:
            if self.tokenizer is None:
                raise TaskError("this task needs a tokenizer: set `tokenizer:` to a model dir")
            return self.tokenizer
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.resolve(path))


class TaskOptions(BaseModel):
    """Base of every task type's schema: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None


OptionsT = TypeVar("OptionsT", bound=TaskOptions)
Builder = Callable[[Any, TaskEnv], Task]

#: type name -> (options schema, builder)
TASK_TYPES: dict[str, tuple[type[TaskOptions], Builder]] = {}


def register_task_type(
    name: str, schema: type[OptionsT]
) -> Callable[[Callable[[OptionsT, TaskEnv], Task]], Callable[[OptionsT, TaskEnv], Task]]:
    """Decorator registering ``builder(options, env) -> Task`` under ``type: name``."""

    def deco(builder: Callable[[OptionsT, TaskEnv], Task]) -> Callable[[OptionsT, TaskEnv], Task]:
        TASK_TYPES[name] = (schema, builder)
        return builder

    return deco


def _ensure_builtin() -> None:
    for module in _BUILTIN_MODULES:
        import_module(module)


def validate_task_spec(spec: Mapping[str, Any], where: str = "task") -> TaskOptions:
    """Check a task spec against its type's schema without building it.

    Raises:
        TaskError: No/unknown ``type``, unknown key or bad value, naming ``where.key``.
    """
    _ensure_builtin()
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise TaskError(f"{where}: a task needs `type` (one of {', '.join(sorted(TASK_TYPES))})")
    kind = spec["type"]
    if kind not in TASK_TYPES:
        raise TaskError(
            f"{where}.type: unknown task type {kind!r} (known: {', '.join(sorted(TASK_TYPES))})"
        )
    schema, _ = TASK_TYPES[kind]
    body = {k: v for k, v in spec.items() if k != "type"}
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in (where, *err["loc"]))
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(schema.model_fields))
            raise TaskError(f"{loc}: unknown key for task type {kind} (known: {known})") from None
        raise TaskError(f"{loc}: {err['msg']}") from None


def add_task(
    tasks: dict[str, Task], spec: Mapping[str, Any], env: TaskEnv, where: str = "task"
) -> Task:
    """Build ``spec`` into ``tasks`` under its name; a name given twice is an error.

    Raises:
        TaskError: A task of that name is there already (naming ``where``).
    """
    task = build_task(spec, env, where)
    if task.name in tasks:
        raise TaskError(f"{where}: two tasks are named {task.name!r}; give one a `name:`")
    tasks[task.name] = task
    return task


def build_task(spec: Mapping[str, Any], env: TaskEnv | None = None, where: str = "task") -> Task:
    """Build the task a spec describes (``{"type": ..., ...}``)."""
    options = validate_task_spec(spec, where)
    _, builder = TASK_TYPES[spec["type"]]
    task = builder(options, env or TaskEnv())
    if not isinstance(task, Task):
        raise TaskError(f"{where}: type {spec['type']} built {task!r}, which is not a Task")
    return task
