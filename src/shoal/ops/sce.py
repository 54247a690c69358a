"""SCE — select, calculate, erase (Wan et al., 2024, FuseChat) — METHODS.md §1 ``sce``.

A base and K fine-tunes, no per-model weights: the merge weighs each task vector by
its own energy. Deterministic; every step runs in the compute dtype (mergekit's way).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.ops._common import check_base, stack_f32
from shoal.ops.consensus import elect_sign

# total energies below this give every task vector the same weight 1/K
ENERGY_GUARD = 1e-6
# the per-entry divisor (the agreeing models' summed weights) is at least this
DIVISOR_FLOOR = 1e-6


def sce_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Select: the entries where the K task vectors ``(K, *shape)`` vary the most.

    σ²_i = the population variance over k of τ_k[i]; the mask keeps the
    ``int(nnz(σ²) · select_topk)`` entries of largest σ² (``nnz``: entries with σ² ≠ 0;
    the count is taken in float32, like mergekit's), chosen by ``torch.topk`` so that
    ties at the cut fall as mergekit's do. ``select_topk ≥ 1`` keeps everything,
    ``≤ 0`` nothing.

    Returns:
        a 0/1 mask of one task vector's shape, in the dtype of ``deltas``.
    """
    shape = deltas.shape[1:]
    if select_topk >= 1.0:
        return torch.ones(shape, dtype=deltas.dtype, device=deltas.device)
    mask = torch.zeros(shape, dtype=deltas.dtype, device=deltas.device)
    if select_topk <= 0.0:
        return mask
    var = torch.var(deltas, dim=0, unbiased=False)
    count = int(torch.count_nonzero(var) * select_topk)
    if count > 0:
        picked = torch.topk(var.abs().reshape(-1), k=count, largest=True).indices
        mask.view(-1)[picked] = 1
    return mask


def sce_weights(deltas: torch.Tensor) -> torch.Tensor:
    """Calculate: one weight per task vector, its mean square over the sum of them.

    w_k = mean_i τ_k[i]² / Σ_l mean_i τ_l[i]², or 1/K each when that sum is below 1e-6
    (all task vectors (nearly) zero).

    Returns:
        a ``(K,)`` tensor in the dtype of ``deltas``.
    """
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    if abs(total) < ENERGY_GUARD:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def sce(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    select_topk: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SCE merge of K fine-tuned tensors onto their base.

    1. select: τ̂_k = τ_k ⊙ m, m = :func:`sce_mask` (the ``select_topk`` fraction of
       entries of largest variance across the models; one mask for all k);
    2. calculate: w_k = :func:`sce_weights` (each τ̂_k's mean square, normalised);
    3. erase: s = sign(Σ_k τ̂_k) (unweighted; a zero sum elects +1); e_k = [sign τ̂_k = s]
       (a zero entry agrees with nothing);
    4. θ = θ_base + Σ_k w_k e_k τ̂_k / max(Σ_k w_k e_k, 1e-6).

    Args:
        base: the common ancestor's tensor.
        tensors: K fine-tuned tensors.
        select_topk: fraction of entries kept in step 1 (1 keeps all).
        dtype: the compute dtype (float32 unless given); every step runs in it.

    Returns:
        tensor of the common shape in ``dtype``.
    """
    x = stack_f32(tensors, dtype=dtype)
    b = check_base(base, x)
    deltas = x.sub_(b)  # a fresh stack: it becomes the task vectors
    if select_topk < 1.0:
        deltas.mul_(sce_mask(deltas, select_topk))
    agree = deltas.sign() == elect_sign(deltas, "sum")
    w = sce_weights(deltas).reshape(-1, *([1] * (deltas.ndim - 1)))
    kept = w * agree
    merged = (deltas * kept).sum(dim=0)
    return b + merged / kept.sum(dim=0).clamp(min=DIVISOR_FLOOR)
