"""Model Stock (Jang et al., 2024) — METHODS.md §1 ``model_stock``."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import torch

from shoal.errors import MergeError
from shoal.ops._common import check_base, stack_f32
from shoal.ops.slerp import cosine


def model_stock_ratio(cos_theta: float, n: int) -> float:
    """Interpolation ratio t = N·cos θ / (1 + (N − 1)·cos θ) (Model Stock, Eq. (2))."""
    den = 1.0 + (n - 1) * cos_theta
    if abs(den) < 1e-12:
        raise MergeError(f"model_stock: degenerate angle (cos θ = {cos_theta:.6g}, N = {n})")
    return n * cos_theta / den


def model_stock(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False
) -> torch.Tensor:
    """Pull the fine-tunes' average toward the base by their mutual angle.

    cos θ = mean over pairs k < l of cos(τ_k, τ_l);
    t = N·cos θ / (1 + (N − 1)·cos θ);
    θ = t · mean_k θ_k + (1 − t) · θ_base.
    A zero task vector counts as orthogonal to everything (cos 0).

    Args:
        base: the common ancestor's tensor.
        tensors: N ≥ 2 fine-tuned tensors.
        filter_wise: one angle (and t) per row (last dimension) instead of one per
            tensor (mergekit's ``filter_wise`` option; 1-D tensors are one row).

    Returns:
        float32 tensor of the common shape.
    """
    x = stack_f32(tensors)
    b = check_base(base, x)
    n = x.shape[0]
    if n < 2:
        raise MergeError(f"model_stock needs at least 2 fine-tuned models, got {n}")
    deltas = x - b
    pairs = list(combinations(range(n), 2))
    if not filter_wise:
        cos_theta = sum(cosine(deltas[i], deltas[j]) for i, j in pairs) / len(pairs)
        t = model_stock_ratio(cos_theta, n)
        return t * x.mean(0) + (1.0 - t) * b
    rows = deltas.reshape(n, -1, b.shape[-1] if b.ndim else 1).to(torch.float64)
    norms = rows.norm(dim=-1)
    cos_rows = torch.stack(
        [
            ((rows[i] * rows[j]).sum(-1) / (norms[i] * norms[j]).clamp_min(1e-12)).clamp(-1, 1)
            for i, j in pairs
        ]
    ).mean(0)
    t_rows = (n * cos_rows / (1 + (n - 1) * cos_rows)).to(torch.float32).unsqueeze(-1)
    mean = x.mean(0).reshape(rows.shape[1:])
    out = t_rows * mean + (1 - t_rows) * b.reshape(rows.shape[1:])
    return out.reshape(b.shape)
