"""Tasks written by the user in Python.

- ``type: python``: ``target: "package.module:make_task"`` is called with ``options`` as
  keyword arguments and returns a :class:`~shoal.tasks.base.Task` (anything with ``name``,
  ``__len__`` and ``score(model)``).
- ``type: function``: ``target: "package.module:score"`` is called as
  ``score(model, **options)`` and returns ``size`` scores in [0, 1]; ``name`` is required.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

import numpy as np
from pydantic import Field

from shoal.errors import ShoalError, TaskError
from shoal.tasks.base import Task
from shoal.tasks.registry import TaskEnv, TaskOptions, register_task_type

__all__ = ["FunctionTask", "import_callable"]


def import_callable(
    target: str, where: str, error: type[ShoalError] = TaskError
) -> Callable[..., Any]:
    """Import ``"package.module:function"`` (dotted attribute path after the colon allowed).

    Args:
        target: the ``"package.module:attr"`` string.
        where: the config key holding ``target``, named in error messages.
        error: the error class raised.

    Raises:
        ShoalError: ``error``, for a malformed string, a missing module or attribute, or an
            attribute that is not callable.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise error(f"{where}: {target!r} is not 'package.module:function'")
    try:
        obj: Any = import_module(module_name)
    except ImportError as exc:
        raise error(f"{where}: cannot import module {module_name!r} ({exc})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{where}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise error(f"{where}: {target!r} is not callable")
    return obj  # type: ignore[no-any-return]


class PythonOptions(TaskOptions):
    """Fields of ``type: python``."""

    target: str = Field(..., description="'package.module:make_task' returning a Task.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments.")


class FunctionOptions(TaskOptions):
    """Fields of ``type: function``."""

    name: str = Field(..., description="Task name (required).")  # type: ignore[assignment]
    target: str = Field(..., description="'package.module:score' called as score(model, ...).")
    size: int = Field(..., ge=1, description="Number of scores the function returns.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments.")


@dataclass
class FunctionTask:
    """A task around a scoring function ``fn(model, **options) -> (size,) scores``."""

    name: str
    fn: Callable[..., Any]
    size: int
    options: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.size

    def score(self, model: Any) -> np.ndarray:
        """Call the function; shape and range are checked by the caller."""
        return np.asarray(self.fn(model, **self.options), dtype=np.float64)


@register_task_type("python", PythonOptions)
def build_python(o: PythonOptions, env: TaskEnv) -> Task:
    """Call the user's factory."""
    factory = import_callable(o.target, "task.target")
    try:
        task = factory(**o.options)
    except TypeError as exc:  # options that do not fit the factory's signature
        raise TaskError(f"task.target {o.target!r} rejects options {o.options}: {exc}") from None
    if not isinstance(task, Task):
        raise TaskError(f"task.target {o.target!r} returned {type(task).__name__}, not a Task")
    if o.name is not None:
        task.name = o.name
    return task


@register_task_type("function", FunctionOptions)
def build_function(o: FunctionOptions, env: TaskEnv) -> Task:
    """Wrap the user's scoring function."""
    return FunctionTask(o.name, import_callable(o.target, "task.target"), o.size, dict(o.options))
