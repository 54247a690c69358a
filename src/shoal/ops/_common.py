"""Shared helpers of the merge operators: fp32 upcast and input checks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.errors import MergeError

# divisors smaller than this are treated as zero (mergekit uses the same guard)
ZERO_GUARD = 1e-8


def f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 (a copy only when a cast is needed)."""
    return t.to(torch.float32)


def stack_f32(tensors: Sequence[torch.Tensor], what: str = "models") -> torch.Tensor:
    """Stack same-shaped tensors into one float32 tensor of shape ``(K, *shape)``."""
    if len(tensors) == 0:
        raise MergeError(f"no {what} to merge")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise MergeError(
                f"shape mismatch between {what}: #0 is {list(shape)}, #{i} is {list(t.shape)}"
            )
    return torch.stack([f32(t) for t in tensors])


def check_base(base: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """``base`` as float32, checked to have the shape of the models."""
    if base.shape != stacked.shape[1:]:
        raise MergeError(
            f"shape mismatch: base is {list(base.shape)}, models are {list(stacked.shape[1:])}"
        )
    return f32(base)


def per_model(values: Sequence[float], k: int, what: str) -> list[float]:
    """Check that one value per model was given."""
    vals = [float(v) for v in values]
    if len(vals) != k:
        raise MergeError(f"{len(vals)} {what} given for {k} models")
    return vals


def checked_sparse_inputs(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float]]:
    """Inputs of a sparsifying merge (TIES, DARE, breadcrumbs), upcast and checked.

    Returns:
        ``(x, b, w, d)``: the models stacked as float32 ``(K, *shape)``, the base as
        float32, and one weight and one density per model.
    """
    x = stack_f32(tensors)
    b = check_base(base, x)
    k = x.shape[0]
    return x, b, per_model(weights, k, "weights"), per_model(densities, k, "densities")


def weight_column(
    weights: Sequence[float], ndim: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Weights shaped ``(K, 1, ..., 1)`` to broadcast against ``(K, *shape)`` on ``device``."""
    return torch.tensor(weights, dtype=torch.float32, device=device).reshape(-1, *([1] * ndim))


def safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``|den| >= ZERO_GUARD``; entries with a zero divisor keep ``num``."""
    den = torch.where(den.abs() < ZERO_GUARD, torch.ones_like(den), den)
    return num / den
