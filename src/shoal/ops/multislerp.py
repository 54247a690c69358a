"""Multi-SLERP (Goddard, 2025): barycentric interpolation of K models on the hypersphere —
METHODS.md §1 ``multislerp``.

The K directions are averaged in the tangent space at their (normalised) weighted mean
and mapped back to the sphere; the norm is the weighted mean norm. With a base, the
same is done to the task vectors and the base added back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.errors import MergeError
from shoal.ops._common import check_base, per_model, stack_f32


def multislerp(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Spherical barycentre of K tensors (or of their task vectors, given a base).

    With x_k = θ_k (or θ_k − θ_base), flattened, n_k = ‖x_k‖, u_k = x_k / (n_k + eps)
    and weights w_k (divided by Σ w when ``normalize_weights``):

        m = Σ w_k u_k / ‖Σ w_k u_k‖                    (the mean direction)
        v = Σ w_k (u_k − (u_k·m) m)                    (the mean tangent at m)
        θ = (Σ w_k n_k) · (cos(‖v‖+eps) m + sin(‖v‖+eps)/(‖v‖+eps) · v)  [+ θ_base]

    One tensor is returned as it is (with or without a base). When ‖Σ w_k u_k‖ < eps
    (directions that cancel), two tensors are interpolated linearly, w_1 x_1 + w_2 x_2
    [+ θ_base]; more are an error. Every step runs in ``dtype``, as mergekit's does.

    Args:
        tensors: K tensors of one parameter.
        weights: K weights.
        base: the origin of the sphere (task vectors are taken from it), or ``None``.
        normalize_weights: divide the weights by their sum.
        eps: guard of the norms and the degeneracy threshold.
        dtype: the compute dtype (float32 unless given).

    Returns:
        tensor of the common shape in ``dtype``.

    Raises:
        MergeError: shapes differ, weights sum to zero with ``normalize_weights``, or
            more than two directions cancel out.
    """
    x = stack_f32(tensors, dtype=dtype)
    k = x.shape[0]
    w_list = per_model(weights, k, "weights")
    if k == 1:
        return x[0]
    b = None if base is None else check_base(base, x)
    if b is not None:
        x -= b
    flat = x.reshape(k, -1)
    w = torch.tensor(w_list, dtype=dtype, device=x.device)
    if normalize_weights:
        if sum(w_list) == 0.0:
            raise MergeError(f"multislerp: weights {w_list} sum to zero, cannot normalize")
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    column = w.reshape(-1, 1)
    mean = (units * column).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if k != 2:
            raise MergeError(
                f"multislerp: the weighted directions of the {k} models cancel out "
                "(antipodal models with balancing weights); change the weights"
            )
        out = x[0] * w[0] + x[1] * w[1]
        return out if b is None else out + b
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * column).sum(0)
    step = torch.norm(tangent) + eps
    direction = mean * torch.cos(step) + tangent * (torch.sin(step) / step)
    out = (direction * (norms.squeeze(-1) * w).sum()).reshape(x.shape[1:])
    return out if b is None else out + b
