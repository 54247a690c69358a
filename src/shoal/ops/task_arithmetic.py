"""Task arithmetic (Ilharco et al., 2023) — METHODS.md §1 ``task_arithmetic``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.errors import MergeError
from shoal.ops._common import ZERO_GUARD, check_base, per_model, stack_f32
from shoal.ops.consensus import combine


def task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    lam: float = 1.0,
    normalize: bool = False,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Add weighted task vectors to the base.

    θ = θ_base + λ Σ_k w_k τ_k, τ_k = θ_k − θ_base (METHODS.md §1); with
    ``normalize`` the sum is divided by Σ_k w_k.

    Args:
        base: the common ancestor's tensor.
        tensors: K fine-tuned tensors of the same shape.
        weights: K weights.
        lam: global scale λ.
        normalize: divide by the sum of the weights.

        dtype: the compute dtype (float32 unless given): task vectors, weights, their
            sum and the division all run in it, as in mergekit.

    Returns:
        tensor of the common shape in ``dtype``.
    """
    x = stack_f32(tensors, dtype=dtype)
    b = check_base(base, x)
    w = per_model(weights, x.shape[0], "weights")
    if normalize and abs(sum(w)) < ZERO_GUARD:
        raise MergeError(
            f"task_arithmetic: weights {w} sum to zero, cannot normalize (set normalize: false)"
        )
    delta = combine(x.sub_(b), w, consensus="none", normalize=normalize)
    if lam != 1.0:
        delta.mul_(lam)
    return delta.add_(b)
