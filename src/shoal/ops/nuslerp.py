"""NuSLERP (mergekit): SLERP of two models by their weights, over the whole tensor or
vector by vector, of the models or of their task vectors — METHODS.md §1 ``nuslerp``.

Unlike :func:`shoal.ops.slerp`, the interpolated vectors may be the rows (or columns)
of a tensor, each with its own angle, and two colinear vectors fall back to linear
interpolation only where they are (exactly) colinear.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.errors import MergeError
from shoal.ops._common import check_base, per_model, stack_f32

# weight sums below this give t = 1/2
WEIGHT_GUARD = 1e-6
# vectors shorter than this are scaled by 1/NORM_FLOOR, not by 1/‖v‖
NORM_FLOOR = 1e-7


def nuslerp_t(weights: Sequence[float]) -> float:
    """The SLERP factor of two weights: t = w_2 / (w_1 + w_2), ½ when |w_1 + w_2| < 1e-6."""
    w = per_model(weights, 2, "weights")
    total = w[0] + w[1]
    return 0.5 if abs(total) < WEIGHT_GUARD else w[1] / total


def nuslerp(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    *,
    row_wise: bool = False,
    flatten: bool = True,
    eps: float = 1e-8,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1), vector by vector.

    The vectors are the whole flattened tensor (``flatten``, the default), else the
    slices along the last dimension (rows of a matrix), or with ``row_wise`` those along
    the first (columns) — ``flatten`` wins over ``row_wise``. For each pair, with
    cos Ω = clamp(â·b̂, −1, 1) (â = a / max(‖a‖, 1e-7)):

        θ = (sin((1 − t)Ω) a + sin(tΩ) b) / sin Ω,

    or (1 − t) a + t b where 1 − cos²Ω ≤ eps² (colinear). Every step runs in ``dtype``.

    Args:
        a: tensor at t = 0.
        b: tensor at t = 1, same shape.
        t: interpolation factor.
        row_wise: interpolate the slices along dimension 0 (when not ``flatten``).
        flatten: interpolate the whole tensor as one vector.
        eps: colinearity threshold.
        dtype: the compute dtype (float32 unless given).

    Returns:
        tensor of the common shape in ``dtype``.
    """
    if a.shape != b.shape:
        raise MergeError(f"nuslerp: shape mismatch {list(a.shape)} vs {list(b.shape)}")
    shape = a.shape
    v0, v1 = a.to(dtype), b.to(dtype)
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    omega = torch.acos(torch.where(colinear, 0, cos))  # finite everywhere, used off colinear
    spherical = (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp_merge(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    *,
    row_wise: bool = False,
    flatten: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """NuSLERP of two models by their weights, optionally of their task vectors.

    θ = nuslerp(θ_1, θ_2, t) without a base, θ_base + nuslerp(τ_1, τ_2, t) with one,
    t = :func:`nuslerp_t` (w_1, w_2).

    Args:
        tensors: the two models' tensors.
        weights: their two weights.
        base: the base whose task vectors are interpolated, or ``None``.
        row_wise: see :func:`nuslerp`.
        flatten: see :func:`nuslerp`.
        dtype: the compute dtype (float32 unless given).

    Returns:
        tensor of the common shape in ``dtype``.
    """
    x = stack_f32(tensors, dtype=dtype)
    if x.shape[0] != 2:
        raise MergeError(f"nuslerp merges exactly 2 models, got {x.shape[0]}")
    t = nuslerp_t(weights)
    if base is None:
        return nuslerp(x[0], x[1], t, row_wise=row_wise, flatten=flatten, dtype=dtype)
    b = check_base(base, x)
    delta = nuslerp(x[0] - b, x[1] - b, t, row_wise=row_wise, flatten=flatten, dtype=dtype)
    return b + delta
