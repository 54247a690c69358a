"""Arcee Fusion (Arcee AI): keep only the other model's most important changes —
METHODS.md §1 ``arcee_fusion``.

An entry's importance is its change times how much the change moves the row's softmax
(a KL divergence); the changes whose importance is an outlier above the tensor's
quartiles (median + 1.5 · IQR) are taken, all others stay the base's. Deterministic.
"""

from __future__ import annotations

import torch

from shoal.errors import MergeError
from shoal.ops.masks import kth_smallest

# added to both softmaxes before the logarithm (no log 0)
SOFTMAX_FLOOR = 1e-8
# the threshold lies this many interquartile ranges above the median
IQR_FACTOR = 1.5


def fusion_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Importance of each entry's change: |θ − θ_base| · KL(p ‖ q) of its row.

    p = softmax(θ) + 1e-8 and q = softmax(θ_base) + 1e-8 along the last dimension (a
    1-D tensor is one row), KL(p ‖ q) = Σ p log(p/q) over the row. Computed in the
    inputs' dtype (give both the same).
    """
    p = torch.softmax(other, dim=-1) + SOFTMAX_FLOOR
    q = torch.softmax(base, dim=-1) + SOFTMAX_FLOOR
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (other - base).abs() * kl


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """median + 1.5 · (Q3 − Q1) of all entries, as a 0-d tensor in their dtype.

    The quartile Q_q is the entry at 0-based position ⌊q (n − 1)⌋ of the sorted entries
    (no interpolation), found exactly by selection. mergekit estimates the quartiles of
    tensors of more than 10⁶ entries from a random sample of 10⁶; shoal takes them over
    all entries (the value the sample estimates, and the same on every run).
    """
    flat = importance.reshape(-1)
    n = flat.numel()
    if n == 0:
        raise MergeError("arcee_fusion: an empty tensor has no quartiles")
    values = flat.to(torch.float32)  # exact for float16/bfloat16: the order is the same

    def quartile(num: int) -> torch.Tensor:
        return kth_smallest(values, num * (n - 1) // 4 + 1).to(flat.dtype)

    q1, median, q3 = quartile(1), quartile(2), quartile(3)
    return median + IQR_FACTOR * (q3 - q1)


def arcee_fusion(
    base: torch.Tensor, other: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fuse the important changes of ``other`` into ``base``.

    m = [importance ≥ threshold] (:func:`fusion_importance`, :func:`fusion_threshold`);
    θ = θ_base + (θ − θ_base) · m.

    Importance and threshold are computed in ``dtype``; the mask is float32 and so is
    the sum (as mergekit's, whose float mask promotes it; the caller rounds to
    ``dtype``).

    Args:
        base: the base model's tensor.
        other: the other model's tensor, same shape.
        dtype: the compute dtype (float32 unless given).

    Returns:
        float32 tensor of the common shape (float64 for float64).
    """
    if base.shape != other.shape:
        raise MergeError(
            f"arcee_fusion: shape mismatch, base {list(base.shape)} vs {list(other.shape)}"
        )
    a, b = base.to(dtype), other.to(dtype)
    importance = fusion_importance(a, b)
    mask = (importance >= fusion_threshold(importance)).float()
    return a + (b - a) * mask
