"""``type: testbed`` tasks: one split of one skill of a built LM testbed (``shoal.testbed``).

It lives here rather than in ``shoal.tasks`` because the testbed part sits above tasks
(it uses :class:`~shoal.tasks.generation.GenerationTask`); workers import this module so
the type is always registered where tasks are built.

Example::

    tasks:
      fitness: [{type: testbed, dir: tb, skill: gcd, split: train, limit: 64}]
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shoal.tasks.base import Task
from shoal.tasks.registry import TaskEnv, TaskOptions, register_task_type

__all__ = ["TestbedOptions"]


class TestbedOptions(TaskOptions):
    """Fields of ``type: testbed``."""

    dir: str = Field(..., description="The testbed directory (shoal testbed build).")
    skill: str = Field(..., description="Skill name, e.g. gcd.")
    split: Literal["train", "validation", "test"] = Field(
        default="train", description="Data split."
    )
    limit: int | None = Field(
        default=None, ge=1, description="Use only the first `limit` examples."
    )
    batch_size: int = Field(default=64, ge=1, description="Prompts per generation batch.")
    partial: bool = Field(
        default=False, description="reasoning-gym partial credit instead of exact."
    )


@register_task_type("testbed", TestbedOptions)
def build_testbed_task(o: TestbedOptions, env: TaskEnv) -> Task:
    """The testbed's own :class:`GenerationTask` for (skill, split)."""
    from shoal.testbed import load_testbed

    tb = load_testbed(env.resolve(o.dir))
    task = tb.task(
        o.skill,
        o.split,
        limit=o.limit,
        batch_size=o.batch_size,
        partial=o.partial,
        tokenizer=env.tokenizer,
    )
    if o.name is not None:
        task.name = o.name
    return task
