"""Classification task: per-example correctness, chunking, errors, Task protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal.errors import TaskError
from shoal.tasks.base import Task, check_scores
from shoal.tasks.classification import ClassificationTask, image_tasks


class _Fixed(torch.nn.Module):
    """Returns the logits stored for each input index (input = index as a float)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0].long()]


def test_per_example_correctness_by_hand() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [0.0, 5.0, 1.0], [1.0, 0.0, 0.0]])
    x = torch.arange(4, dtype=torch.float32)[:, None]
    y = torch.tensor([0, 1, 1, 2])
    task = ClassificationTask("t", x, y)
    assert isinstance(task, Task) and len(task) == 4
    got = task.score(_Fixed(logits))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(check_scores(task, got), got)
    assert task.accuracy(_Fixed(logits)) == 0.5
    chunked = ClassificationTask("t", x, y, batch_size=3)
    np.testing.assert_array_equal(chunked.score(_Fixed(logits)), got)
    # plain callables work too
    np.testing.assert_array_equal(task.score(lambda inp: logits[inp[:, 0].long()]), got)


def test_bad_inputs_name_the_task() -> None:
    with pytest.raises(TaskError, match="'bad': 3 inputs but 2 labels"):
        ClassificationTask("bad", torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TaskError, match="integer"):
        ClassificationTask("bad", torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(TaskError, match="batch_size"):
        ClassificationTask("bad", torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), batch_size=0)


def test_image_tasks_names() -> None:
    class D:
        name = "toy"
        x_train, y_train = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
        x_test, y_test = torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)

    tasks = image_tasks(D())
    assert tasks["train"].name == "toy-train" and len(tasks["test"]) == 1


def test_check_scores_zeroes_nan_and_refuses_out_of_range() -> None:
    task = ClassificationTask("t", torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))
    good = np.array([0.0, 0.25, 1.0, 0.5])
    checked = check_scores(task, good)
    np.testing.assert_array_equal(checked, good)
    assert not np.shares_memory(checked, good)  # the task may reuse its array
    np.testing.assert_array_equal(
        check_scores(task, np.array([np.nan, 1.0, np.inf, -np.inf])), [0.0, 1.0, 0.0, 0.0]
    )
    with pytest.raises(ValueError, match="'t' returned scores outside"):
        check_scores(task, np.array([0.0, 1.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="'t' returned scores outside"):
        check_scores(task, np.array([np.nan, -0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="returned 3 scores for 4"):
        check_scores(task, np.zeros(3))


def test_an_empty_task_never_calls_the_model() -> None:
    def refuse(x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("called on an empty batch")

    task = ClassificationTask("empty", torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert task.score(refuse).shape == (0,) and task.accuracy(refuse) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ties_and_nan_count_as_torch_argmax_counts_them(dtype: torch.dtype) -> None:
    """The arg-max is numpy's: against torch's (the first maximum; NaN is the maximum) on
    logits full of ties and NaNs, in every dtype a model may return."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (500, 4), generator=g).to(dtype)  # many ties
    logits[torch.rand(500, 4, generator=g) < 0.1] = float("nan")
    y = torch.randint(0, 4, (500,), generator=g)
    task = ClassificationTask("t", torch.arange(500.0)[:, None], y)
    want = (logits.argmax(-1) == y).numpy()  # torch, in the logits' own dtype
    np.testing.assert_array_equal(task.correct(logits), want)
    np.testing.assert_array_equal(task.score(_Fixed(logits)), want.astype(float))
