"""Classification on in-memory tensors: one 0/1 score per example (correct or not).

The model is called on the whole input in one batched forward pass (or in chunks of
``batch_size``); the predicted class is the arg-max of the logits. This is the task
of M2N2's image experiments, and it is fast: one matmul chain per evaluation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from shoal.errors import TaskError


class ClassificationTask:
    """Score a classifier on fixed inputs; per-example score 1.0 if the arg-max equals the label.

    Args:
        name: unique task name within a run (``digits-train``, ...).
        x: inputs, shape ``(n, ...)``; passed to the model as they are.
        y: integer labels, shape ``(n,)``.
        batch_size: examples per forward pass; ``None`` = all at once.
    """

    def __init__(
        self, name: str, x: torch.Tensor, y: torch.Tensor, *, batch_size: int | None = None
    ) -> None:
        if x.shape[0] != y.shape[0]:
            raise TaskError(
                f"task {name!r}: {x.shape[0]} inputs but {y.shape[0]} labels (must be equal)"
            )
        if y.ndim != 1 or y.dtype.is_floating_point:
            raise TaskError(f"task {name!r}: labels must be a 1-D integer tensor")
        if batch_size is not None and batch_size < 1:
            raise TaskError(f"task {name!r}: batch_size must be ≥ 1, got {batch_size}")
        self.name = name
        self.x = x
        self.y = y.to(torch.int64)
        self._labels = self.y.cpu().numpy()
        self.batch_size = batch_size

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def correct(self, logits: torch.Tensor, start: int = 0) -> np.ndarray:
        """Boolean correctness from logits ``(..., m, classes)`` of examples ``start…start+m``.

        The arg-max of logits on the CPU is numpy's (the first maximum, as torch's; a NaN
        counts as the maximum in both), a third of torch's time for M2N2's 1,437 × 10
        logits; on an accelerator it is torch's, so only the indices travel.
        """
        labels = self._labels[start : start + logits.shape[-2]]
        logits = logits.detach()
        if logits.device.type != "cpu":
            return logits.argmax(-1).cpu().numpy() == labels
        if logits.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            logits = logits.float()
        return logits.numpy().argmax(-1) == labels

    def score(self, model: Any) -> np.ndarray:
        """Per-example correctness of ``model`` (an ``nn.Module`` or any callable on tensors).

        Returns:
            float64 array of shape ``(len(self),)`` with values 0.0 or 1.0.
        """
        device = _device_of(model)
        n = len(self)
        step = self.batch_size or max(n, 1)
        with torch.no_grad():
            if 0 < n <= step:  # one pass, no chunk buffer (M2N2 scores this once a child)
                hits = self.correct(model(self.x.to(device)))
            else:
                hits = np.empty(n, dtype=bool)
                for start in range(0, n, step):
                    xb = self.x[start : start + step].to(device)
                    hits[start : start + step] = self.correct(model(xb), start)
        return hits.astype(np.float64)

    def accuracy(self, model: Any) -> float:
        """Mean of :meth:`score`."""
        return float(self.score(model).mean()) if len(self) else 0.0


def _device_of(model: Any) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def image_tasks(data: Any, *, prefix: str | None = None) -> dict[str, ClassificationTask]:
    """Train and test tasks of an ``ImageData`` (``shoal.testbed.images``), keyed by split.

    Names are ``<prefix>-train`` and ``<prefix>-test`` (prefix defaults to the data's name).
    """
    p = prefix or data.name
    return {
        "train": ClassificationTask(f"{p}-train", data.x_train, data.y_train),
        "test": ClassificationTask(f"{p}-test", data.x_test, data.y_test),
    }
