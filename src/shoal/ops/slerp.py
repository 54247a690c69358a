"""Spherical linear interpolation (Shoemake, 1985) — METHODS.md §1 ``slerp``."""

from __future__ import annotations

import math

import torch

from shoal.errors import MergeError
from shoal.ops._common import f32


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the angle between two tensors seen as flat vectors (0 if one is zero).

    Computed in float64; a float64 input is used as it is (no copy), so a caller that
    takes several angles over slices of one vector converts it once.
    """
    a64 = a.reshape(-1) if a.dtype == torch.float64 else a.reshape(-1).to(torch.float64)
    b64 = b.reshape(-1) if b.dtype == torch.float64 else b.reshape(-1).to(torch.float64)
    # linalg.vector_norm is what Tensor.norm() runs for a vector, minus its Python dispatch
    na, nb = float(torch.linalg.vector_norm(a64)), float(torch.linalg.vector_norm(b64))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return max(-1.0, min(1.0, float(a64 @ b64) / (na * nb)))


def slerp(
    a: torch.Tensor,
    b: torch.Tensor,
    t: float,
    *,
    cos: float | None = None,
    eps: float = 1e-6,
    dot_threshold: float | None = None,
) -> torch.Tensor:
    """Interpolate on the great circle from ``a`` (t = 0) to ``b`` (t = 1).

    Ω = arccos(cos(a, b));
    θ = sin((1 − t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b.
    The unnormalised tensors are interpolated (their norms are not forced to 1).
    Falls back to linear interpolation (1 − t)·a + t·b when sin Ω ≤ ``eps``, when
    either tensor is zero (only without ``dot_threshold``: mergekit counts a zero
    tensor as orthogonal, cos Ω = 0), or,
    when ``dot_threshold`` is given, when |cos Ω| > ``dot_threshold``
    (``dot_threshold=0.9995`` reproduces mergekit).

    Args:
        a: tensor at t = 0 (mergekit: the base model).
        b: tensor at t = 1, same shape.
        t: interpolation factor (values outside [0, 1] extrapolate).
        cos: use this cos Ω instead of computing it from ``a`` and ``b`` (e.g. an
            angle taken over a whole model).
        eps: degeneracy threshold on sin Ω.
        dot_threshold: optional |cos Ω| above which to interpolate linearly.

    Returns:
        float32 tensor of the common shape.
    """
    if a.shape != b.shape:
        raise MergeError(f"slerp: shape mismatch {list(a.shape)} vs {list(b.shape)}")
    a32, b32 = f32(a), f32(b)
    if cos is None and dot_threshold is None and (not bool(a32.any()) or not bool(b32.any())):
        # no angle to a zero tensor; mergekit (dot_threshold set) treats it as orthogonal
        return (1.0 - t) * a32 + t * b32
    c = cosine(a32, b32) if cos is None else cos
    ca, cb = slerp_weights(t, c, eps=eps, dot_threshold=dot_threshold)
    return ca * a32 + cb * b32


def slerp_weights(
    t: float, cos: float, *, eps: float = 1e-6, dot_threshold: float | None = None
) -> tuple[float, float]:
    """The two coefficients of :func:`slerp`: θ = w_a · a + w_b · b.

    sin((1 − t)Ω)/sin Ω and sin(tΩ)/sin Ω with Ω = arccos(cos) (clamped to [−1, 1]), or
    the linear 1 − t and t where :func:`slerp` falls back to linear interpolation.
    """
    c = max(-1.0, min(1.0, float(cos)))
    omega = math.acos(c)
    sin_omega = math.sin(omega)
    if sin_omega <= eps or (dot_threshold is not None and abs(c) > dot_threshold):
        return 1.0 - t, t
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega
