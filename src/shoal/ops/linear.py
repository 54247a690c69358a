"""Linear (weighted-average) merge — METHODS.md §1 ``linear``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.errors import MergeError
from shoal.ops._common import ZERO_GUARD, f32, per_model


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
    if len(tensors) == 0:
        raise MergeError("no models to merge")
    w = per_model(weights, len(tensors), "weights")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise MergeError(
                f"shape mismatch between models: #0 is {list(shape)}, #{i} is {list(t.shape)}"
            )
    total = sum(w)
    if normalize and abs(total) < ZERO_GUARD:
        raise MergeError(
            f"linear merge: weights {w} sum to zero, cannot normalize (set normalize: false)"
        )
    # Accumulated in place: no (K, *shape) stack, about 5x faster than stack-multiply-sum
    # on a large tensor and bit-equal to it (add_ with alpha rounds w_k θ_k, then the sum,
    # in the same order; the division comes last, as in mergekit).
    first = f32(tensors[0])
    out = first.mul(w[0]) if first is tensors[0] else first.mul_(w[0])  # one copy, not two
    for t, wk in zip(tensors[1:], w[1:], strict=True):
        out.add_(t, alpha=wk)
    return out.div_(total) if normalize else out
