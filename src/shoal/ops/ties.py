"""TIES-merging (Yadav et al., 2023): trim, elect sign, disjoint merge — METHODS.md §1 ``ties``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.ops._common import checked_sparse_inputs
from shoal.ops.consensus import Majority, onto_base
from shoal.ops.masks import magnitude_mask


def ties(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool = True,
    majority: Majority = "sum",
    lam: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """TIES merge of K fine-tuned tensors onto their base.

    1. trim: τ̂_k = τ_k ⊙ top-``density_k`` mask of |τ_k|;
    2. elect: s = sign(Σ_k w_k τ̂_k) (``majority="count"``: by sign count);
    3. disjoint merge: Σ over models with sign(w_k τ̂_k) = s of w_k τ̂_k, divided by
       the sum of those models' weights when ``normalize`` (mergekit's convention;
       the weights, not their absolute values);
    4. θ = θ_base + λ · merged delta.

    Every step runs in ``dtype`` (float32 unless given; mergekit computes in its recipe's
    ``dtype``): the task vectors, the weights, the sums and the division.

    Args:
        base: the common ancestor's tensor.
        tensors: K fine-tuned tensors.
        weights: K weights.
        densities: K fractions of each task vector to keep.
        normalize: divide by the agreeing weights.
        majority: sign election rule, ``"sum"`` or ``"count"``.
        lam: scale λ of the merged task vector.
        dtype: the compute dtype.

    Returns:
        tensor of the common shape in ``dtype``.
    """
    x, b, w, d = checked_sparse_inputs(base, tensors, weights, densities, dtype)
    deltas = x.sub_(b)  # x is a fresh stack: it becomes the task vectors, trimmed in place
    for i in range(deltas.shape[0]):
        deltas[i].mul_(magnitude_mask(deltas[i], d[i]))  # faster than masked_fill_ on CPU
    return onto_base(
        b, deltas, w, lam=lam, consensus="ties", normalize=normalize, majority=majority
    )
