"""Karcher mean: the weighted Fréchet mean of the models' directions on the unit sphere,
scaled by their mean norm — METHODS.md §1 ``karcher``.

No base: every input is a model to average (mergekit merges a named base as one more).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.errors import MergeError
from shoal.ops._common import per_model


def _norm(x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """‖x‖₂ over all entries, as a 0-d tensor in the accumulation dtype."""
    return torch.linalg.vector_norm(x.to(acc))


def karcher(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Karcher (Riemannian) mean of K tensors, each seen as a norm and a direction.

    With n_k = ‖θ_k‖, u_k = θ_k / n_k and α_k = w_k / Σ w (equal weights by default),
    over the models with n_k > ``tol`` (their α renormalised to ᾱ):

    1. μ = Σ ᾱ_k u_k / ‖Σ ᾱ_k u_k‖ (the first unit direction when that norm is below
       ``tol``);
    2. up to ``max_iter`` times: the tangent v = Σ ᾱ_k θ_k/sin θ_k · (u_k − cos θ_k · μ)
       with cos θ_k = clamp(μ·u_k, −1, 1) (terms with θ_k < ``tol`` left out); stop when
       ‖v‖ < ``tol``; else μ ← cos‖v‖ · μ + sin‖v‖ · v/‖v‖, renormalised (the
       exponential map);
    3. θ = (Σ_k α_k n_k) · μ — every model's norm counts, also the ones left out.

    All zero (no n_k > ``tol``) gives zeros; one tensor is returned as it is. Vectors are
    kept in ``dtype`` and norms in float32 (float64 for float64), rounding where mergekit
    rounds, so the result is mergekit's to the last bit.

    Args:
        tensors: K tensors of one parameter.
        weights: K weights (``None``: equal).
        max_iter: most iterations of step 2.
        tol: threshold on norms, angles and the tangent's norm.
        dtype: the compute dtype (float32 unless given).

    Returns:
        tensor of the common shape in ``dtype``.
    """
    if len(tensors) == 0:
        raise MergeError("karcher: no models to merge")
    xs = [t.to(dtype) for t in tensors]
    shape = xs[0].shape
    for i, x in enumerate(xs):
        if x.shape != shape:
            raise MergeError(
                f"karcher: shape mismatch, #0 is {list(shape)}, #{i} is {list(x.shape)}"
            )
    if len(xs) == 1:
        return xs[0]
    k = len(xs)
    w = [1.0] * k if weights is None else per_model(weights, k, "weights")
    total = sum(w)
    if total == 0.0:
        raise MergeError(f"karcher: weights {w} sum to zero")
    alphas = [wk / total for wk in w]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    norms = [_norm(x, acc) for x in xs]
    valid = [i for i in range(k) if float(norms[i]) > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    units = [(xs[i] / norms[i]).to(dtype) for i in valid]
    valid_sum = sum(alphas[i] for i in valid)
    coeffs = [alphas[i] / valid_sum for i in valid]

    mean = torch.zeros_like(units[0])
    for c, u in zip(coeffs, units, strict=True):
        mean += c * u
    mean_norm = _norm(mean, acc)
    mean = units[0].clone() if float(mean_norm) < tol else (mean / mean_norm).to(dtype)

    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for c, u in zip(coeffs, units, strict=True):
            cos = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            angle = torch.arccos(cos)
            if float(angle) < tol:
                continue
            tangent += c * (angle / torch.sin(angle)) * (u - cos * mean)
        step = _norm(tangent, acc)
        if float(step) < tol:
            break
        mean = (torch.cos(step) * mean + torch.sin(step) * (tangent / step)).to(dtype)
        length = _norm(mean, acc)
        if float(length) > tol:
            mean = (mean / length).to(dtype)

    scale = sum(a * n for a, n in zip(alphas, norms, strict=True))
    return (scale * mean).to(dtype)
