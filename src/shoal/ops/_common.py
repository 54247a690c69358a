"""Shared helpers of the merge operators: the cast to the compute dtype and input checks.

Operators compute in float32 unless told otherwise; the task-vector operators (task
arithmetic, TIES, DARE, breadcrumbs) take a ``dtype`` so that a recipe's ``dtype:
bfloat16`` computes in bfloat16 as mergekit does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.errors import MergeError

# divisors smaller than this are treated as zero (mergekit uses the same guard)
ZERO_GUARD = 1e-8


def f32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 (a copy only when a cast is needed)."""
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def stack_f32(
    tensors: Sequence[torch.Tensor], what: str = "models", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Stack same-shaped tensors into one tensor of shape ``(K, *shape)`` in ``dtype``
    (float32 unless given)."""
    if len(tensors) == 0:
        raise MergeError(f"no {what} to merge")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise MergeError(
                f"shape mismatch between {what}: #0 is {list(shape)}, #{i} is {list(t.shape)}"
            )
    return torch.stack([t.to(dtype) for t in tensors])


def check_base(base: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """``base`` in the dtype of ``stacked``, checked to have the shape of the models."""
    if base.shape != stacked.shape[1:]:
        raise MergeError(
            f"shape mismatch: base is {list(base.shape)}, models are {list(stacked.shape[1:])}"
        )
    return base.to(stacked.dtype)


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
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, list[float], list[float]]:
    """Inputs of a sparsifying merge (TIES, DARE, breadcrumbs), cast and checked.

    Returns:
        ``(x, b, w, d)``: the models stacked in ``dtype`` ``(K, *shape)``, the base in
        ``dtype``, and one weight and one density per model.
    """
    x = stack_f32(tensors, dtype=dtype)
    b = check_base(base, x)
    k = x.shape[0]
    return x, b, per_model(weights, k, "weights"), per_model(densities, k, "densities")


def weight_column(
    weights: Sequence[float],
    ndim: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Weights shaped ``(K, 1, ..., 1)`` to broadcast against ``(K, *shape)`` on ``device``,
    rounded to ``dtype`` (the compute dtype: mergekit rounds them to it too)."""
    return torch.tensor(weights, dtype=dtype, device=device).reshape(-1, *([1] * ndim))


def safe_divide(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``|den| >= ZERO_GUARD``; entries with a zero divisor keep ``num``."""
    den = torch.where(den.abs() < ZERO_GUARD, torch.ones_like(den), den)
    return num / den


#: norms below this leave the kept entries unscaled (mergekit's guard of its L1 rescale)
L1_GUARD = 1e-7
RESCALES = ("inverse_density", "l1", "none")


def check_rescale(rescale: str, method: str) -> None:
    """A rescale a dropping merge (DARE, DELLA) knows, or a one-line :class:`MergeError`."""
    if rescale not in RESCALES:
        raise MergeError(
            f"unknown {method} rescale {rescale!r} (expected inverse_density, l1 or none)"
        )


def l1_rescale_(kept: torch.Tensor, full_norm: torch.Tensor) -> torch.Tensor:
    """Scale the kept entries of a task vector back to its L1 norm ‖τ‖₁, in place:
    kept · ‖τ‖₁ / ‖kept‖₁ — mergekit's ``rescale``, which leaves them as they are when
    either norm is below :data:`L1_GUARD`."""
    kept_norm = kept.abs().sum()
    if float(kept_norm) >= L1_GUARD and float(full_norm) >= L1_GUARD:
        kept.mul_(full_norm / kept_norm)
    return kept
