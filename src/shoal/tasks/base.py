"""What a task is: something that scores a model, one number in [0, 1] per example.

A task never returns only a mean. Per-example scores are what M2N2's resource
competition and CycleQD's behaviour grid are computed from, and the mean is one
``np.mean`` away for everything else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

#: Scores of one candidate: task name -> per-example scores, shape (n_examples,), float64 in [0, 1].
Scores = Mapping[str, np.ndarray]


@runtime_checkable
class Task(Protocol):
    """A scorer bound to one split of one dataset.

    Attributes:
        name: Unique name of the task within a run (also the key in :data:`Scores`).
    """

    name: str

    def __len__(self) -> int:
        """Number of examples (length of the vector :meth:`score` returns)."""
        ...

    def score(self, model: Any) -> np.ndarray:
        """Score ``model`` on every example.

        Args:
            model: The model to score (an ``nn.Module``; Hugging Face models included).

        Returns:
            Array of shape ``(len(self),)``, dtype float64, values in [0, 1].
        """
        ...


def check_scores(task: Task, scores: np.ndarray) -> np.ndarray:
    """Validate a task's output; NaN (a failed example) counts as the worst score, 0."""
    out = np.array(scores, dtype=np.float64).reshape(-1)  # a copy: the task may reuse its own
    if out.shape != (len(task),):
        raise ValueError(
            f"task {task.name!r} returned {out.shape[0]} scores for {len(task)} examples"
        )
    if out.size and out.min() >= 0.0 and out.max() <= 1.0:
        return out  # the common case: no nan_to_num pass (NaN fails both comparisons)
    out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    if out.min(initial=0.0) < 0.0 or out.max(initial=0.0) > 1.0:
        raise ValueError(f"task {task.name!r} returned scores outside [0, 1]")
    return out
