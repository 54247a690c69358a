"""CycleQD's SVD-based mutation (Kuroki et al., 2025) — METHODS.md §1 ``svd_mutation``, §4."""

from __future__ import annotations

import torch

from shoal.errors import MergeError
from shoal.ops._common import f32


def svd_mutation(
    theta: torch.Tensor,
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    generator: torch.Generator,
    *,
    w_max: float = 0.1,
) -> torch.Tensor:
    """Perturb a weight matrix along the singular directions of a task vector.

    θ′ = θ + U diag(w ⊙ σ) Vᵀ, w ~ U[0, w_max]^r (one uniform per singular value,
    drawn from ``generator``). Tensors that are not 2-D pass through unchanged and
    draw nothing.

    Args:
        theta: the matrix to mutate, ``(m, n)``.
        u: left singular vectors ``(m, r)``.
        s: singular values ``(r,)``.
        vh: right singular vectors, transposed, ``(r, n)``.
        generator: source of w.
        w_max: upper bound of the uniform scale.

    Returns:
        float32 tensor of ``theta``'s shape.
    """
    out = f32(theta)
    if theta.ndim != 2:
        return out.clone()
    r = s.shape[0]
    if u.shape != (theta.shape[0], r) or vh.shape != (r, theta.shape[1]):
        raise MergeError(
            f"svd_mutation: U {list(u.shape)}, σ {list(s.shape)}, Vᵀ {list(vh.shape)} "
            f"do not fit a {list(theta.shape)} matrix"
        )
    w = torch.rand(r, generator=generator, device=generator.device).to(out.device) * w_max
    return out + (f32(u) * (w * f32(s))) @ f32(vh)


def svd_mutation_for(
    theta: torch.Tensor,
    task_vector: torch.Tensor,
    generator: torch.Generator,
    w_max: float = 0.1,
) -> torch.Tensor:
    """:func:`svd_mutation` with the thin SVD of ``task_vector`` computed here in fp32.

    Args:
        theta: the tensor to mutate.
        task_vector: the expert's task vector for the current quality task, same shape.
        generator: source of w.
        w_max: upper bound of the uniform scale.

    Returns:
        float32 tensor of ``theta``'s shape (unchanged copy unless 2-D).
    """
    if theta.shape != task_vector.shape:
        raise MergeError(
            f"svd_mutation: shape mismatch {list(theta.shape)} vs {list(task_vector.shape)}"
        )
    if theta.ndim != 2:
        return f32(theta).clone()
    u, s, vh = torch.linalg.svd(f32(task_vector), full_matrices=False)
    return svd_mutation(theta, u, s, vh, generator, w_max=w_max)
