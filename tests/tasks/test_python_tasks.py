"""``type: python`` and ``type: function`` tasks, and the registry's errors."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest

from shoal.errors import RecipeError, TaskError
from shoal.tasks.base import Task
from shoal.tasks.python import import_callable
from shoal.tasks.registry import TASK_TYPES, build_task, validate_task_spec


@dataclass
class ParityTask:
    """Example j scores 1 when the model (an int) has the parity of j."""

    name: str
    n: int

    def __len__(self) -> int:
        return self.n

    def score(self, model: int) -> np.ndarray:
        return np.array([float(j % 2 == model % 2) for j in range(self.n)])


def make_parity(n: int = 4) -> ParityTask:
    return ParityTask("parity", n)


def half(model: int, scale: float = 0.5) -> list[float]:
    return [scale] * 3


def test_python_factory_and_function():
    task = build_task(
        {
            "type": "python",
            "target": "test_python_tasks:make_parity",
            "options": {"n": 5},
            "name": "p5",
        }
    )
    assert isinstance(task, Task) and task.name == "p5" and len(task) == 5
    assert list(task.score(1)) == [0, 1, 0, 1, 0]
    fn = build_task(
        {
            "type": "function",
            "name": "h",
            "target": "test_python_tasks:half",
            "size": 3,
            "options": {"scale": 0.25},
        }
    )
    assert list(fn.score(0)) == [0.25, 0.25, 0.25]


def test_registry_knows_builtin_types_and_rejects_bad_specs():
    validate_task_spec({"type": "jsonl", "path": "x"})
    assert {"jsonl", "python", "function", "lm-eval"} <= set(TASK_TYPES)
    with pytest.raises(TaskError, match="needs `type`"):
        validate_task_spec({"path": "x"})
    with pytest.raises(TaskError, match=r"task\.target: 'nomodule_xyz'|cannot import"):
        build_task({"type": "python", "target": "nomodule_xyz:f"})
    with pytest.raises(TaskError, match=r"is not 'package\.module:function'"):
        build_task({"type": "python", "target": "nocolon"})
    with pytest.raises(TaskError, match="returned dict, not a Task"):
        build_task({"type": "python", "target": "builtins:dict", "options": {"a": 1}})
    with pytest.raises(TaskError, match="rejects options"):
        build_task(
            {"type": "python", "target": "test_python_tasks:make_parity", "options": {"m": 1}}
        )
    with pytest.raises(TaskError, match=r"task\.size: .*greater than or equal to 1"):
        build_task({"type": "function", "name": "x", "target": "m:f", "size": 0})


def test_import_callable_follows_dotted_paths_and_raises_the_given_error():
    assert import_callable("os.path:join", "x") is os.path.join
    assert import_callable("os:path.join", "x") is os.path.join
    with pytest.raises(RecipeError, match=r"loader\.target: module 'os' has no attribute 'nope'"):
        import_callable("os:nope", "loader.target", RecipeError)
    with pytest.raises(RecipeError, match=r"loader\.target: 'os:sep' is not callable"):
        import_callable("os:sep", "loader.target", RecipeError)
