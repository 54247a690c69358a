"""``type: lm-eval``: a task of EleutherAI's lm-evaluation-harness, scored per example.

Local task definitions only: ``include_path`` names a directory of lm-eval YAML task files
(whose datasets are local files, e.g. ``dataset_path: json`` with ``data_files``); nothing is
downloaded. The live model is handed to lm-eval as ``HFLM(pretrained=model, tokenizer=...)``
(no reload; without ``accelerate``, shoal's :mod:`~shoal.tasks.lm_eval_adapter`), and
the per-example scores are read from lm-eval's per-sample outputs
(``log_samples``), ordered by ``doc_id``. Needs the ``eval`` extra.

Example::

    tasks:
      fitness: [{type: lm-eval, task: my_arith, include_path: lm_tasks, metric: acc}]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from shoal.errors import TaskError
from shoal.tasks.base import Task
from shoal.tasks.registry import TaskEnv, TaskOptions, register_task_type

__all__ = ["LmEvalOptions", "LmEvalTask"]

_DEFAULT_METRICS = ("acc", "exact_match", "acc_norm")


class LmEvalOptions(TaskOptions):
    """Fields of ``type: lm-eval``."""

    task: str = Field(..., description="lm-eval task name (defined in include_path).")
    include_path: str | None = Field(default=None, description="Directory of YAML task files.")
    metric: str | None = Field(
        default=None, description="Per-sample metric (default: acc, else exact_match)."
    )
    limit: int | None = Field(default=None, ge=1, description="First `limit` documents only.")
    num_fewshot: int | None = Field(default=None, ge=0, description="Few-shot examples.")
    batch_size: int = Field(default=8, ge=1, description="lm-eval batch size.")
    tokenizer: str | None = Field(default=None, description="Tokenizer dir (default: worker's).")


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise TaskError("type lm-eval needs the `eval` extra (pip install lm-eval)") from None
    return lm_eval


@dataclass
class LmEvalTask:
    """One lm-eval task; ``score`` runs the harness on the live model."""

    name: str
    task: str
    include_path: str | None
    tokenizer: Any = field(repr=False)
    metric: str | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    size: int = 0

    def __post_init__(self) -> None:
        self._manager = self._task_manager()
        self.size = self._count_docs()

    def _task_manager(self) -> Any:
        _lm_eval()
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=self.include_path, include_defaults=False)

    def _count_docs(self) -> int:
        from lm_eval.tasks import get_task_dict

        try:
            tasks = get_task_dict([self.task], self._manager)
        except (KeyError, ValueError) as exc:
            raise TaskError(
                f"lm-eval task {self.task!r} not found in {self.include_path} ({exc})"
            ) from None
        task = tasks[self.task]
        n = len(list(task.eval_docs))
        return min(n, self.limit) if self.limit is not None else n

    def __len__(self) -> int:
        return self.size

    def score(self, model: Any) -> np.ndarray:
        """Run lm-eval on ``model``; per-example metric values, by ``doc_id``."""
        lm_eval = _lm_eval()
        try:  # lm-eval's own wrapper of a live model needs `accelerate`
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size)
        except ImportError:
            from shoal.tasks.lm_eval_adapter import make_live_lm

            lm = make_live_lm(model, self.tokenizer, self.batch_size)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[self.task],
            task_manager=self._manager,
            limit=self.limit,
            num_fewshot=self.num_fewshot,
            log_samples=True,
            bootstrap_iters=0,
            verbosity="ERROR",
        )
        samples = sorted(results["samples"][self.task], key=lambda s: s["doc_id"])
        if not samples:
            raise TaskError(f"lm-eval task {self.task!r} produced no samples")
        metric = self.metric or next((m for m in _DEFAULT_METRICS if m in samples[0]), None)
        if metric is None or metric not in samples[0]:
            keys = ", ".join(k for k in samples[0] if isinstance(samples[0][k], int | float))
            raise TaskError(f"lm-eval task {self.task!r}: no metric {metric!r} (has {keys})")
        return np.array([float(s[metric]) for s in samples], dtype=np.float64)


@register_task_type("lm-eval", LmEvalOptions)
def build_lm_eval(o: LmEvalOptions, env: TaskEnv) -> Task:
    """Build an :class:`LmEvalTask` (loads the task's documents once to count them)."""
    return LmEvalTask(
        name=o.name or o.task,
        task=o.task,
        include_path=str(env.resolve(o.include_path)) if o.include_path else None,
        tokenizer=env.get_tokenizer(o.tokenizer),
        metric=o.metric,
        limit=o.limit,
        num_fewshot=o.num_fewshot,
        batch_size=o.batch_size,
    )
