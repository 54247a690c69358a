"""Linear (weighted-average) merge — METHODS.md §1 ``linear``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.errors import MergeError
from shoal.ops._common import ZERO_GUARD, per_model, stack_f32, weight_column


def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True
) -> torch.Tensor:
    """Weighted sum of same-shaped tensors.

    θ = Σ_k w_k θ_k / Σ_k w_k  (METHODS.md §1; without the division when
    ``normalize`` is false).

    Args:
        tensors: K tensors of one parameter, any float dtype.
        weights: K weights.
        normalize: divide by the sum of the weights (mergekit's default).

    Returns:
        float32 tensor of the common shape.

    Raises:
        MergeError: shapes differ, wrong number of weights, or the weights sum to
            zero with ``normalize``.
    """
    x = stack_f32(tensors)
    w = per_model(weights, x.shape[0], "weights")
    out = (weight_column(w, x.ndim - 1, x.device) * x).sum(0)
    if normalize:
        total = sum(w)
        if abs(total) < ZERO_GUARD:
            raise MergeError(
                f"linear merge: weights {w} sum to zero, cannot normalize (set normalize: false)"
            )
        out = out / total
    return out
