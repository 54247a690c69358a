"""NearSwap (alchemonaut, 2024): take the other model's value where the two are close —
METHODS.md §1 ``nearswap``.

Entry by entry, the base moves toward the other model by a fraction that is 1 where
they differ by at most ``t`` and falls off as t/|a − b| beyond: nearby values are
swapped in, distant ones mostly kept.
"""

from __future__ import annotations

import torch

from shoal.errors import MergeError

# |a − b| below this is taken as this (no division by zero where the models agree)
MIN_DISTANCE = 1e-6


def nearswap(
    base: torch.Tensor, other: torch.Tensor, t: float, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Interpolate entry by entry, by how near the two models are.

    w = clamp(t / max(|a − b|, 1e-6), 0, 1);  θ = w · b + (1 − w) · a,

    with a the base and b the other model. t = 0 gives the base; where |a − b| ≤ t,
    the other model's value; as t grows every entry tends to b. Every step runs in
    ``dtype``; t / x is computed as x⁻¹ · t, as torch (and so mergekit) does for a
    number divided by a tensor, which rounds the same way in bfloat16.

    Args:
        base: the base model's tensor (a).
        other: the other model's tensor (b), same shape.
        t: the distance up to which b is taken whole (t ≥ 0).
        dtype: the compute dtype (float32 unless given).

    Returns:
        tensor of the common shape in ``dtype``.
    """
    if base.shape != other.shape:
        raise MergeError(
            f"nearswap: shape mismatch, base {list(base.shape)} vs {list(other.shape)}"
        )
    a, b = base.to(dtype), other.to(dtype)
    weight = (a - b).abs_().clamp_(min=MIN_DISTANCE).reciprocal_().mul_(t).clamp_(0, 1)
    return weight * b + (1 - weight) * a
