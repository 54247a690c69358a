"""DARE (Yu et al., 2024): drop and rescale task vectors — METHODS.md §1 ``dare``.

``dare_linear`` is ``consensus="none"``, ``dare_ties`` is ``consensus="ties"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from shoal.ops._common import check_rescale, checked_sparse_inputs, l1_rescale_
from shoal.ops.consensus import Consensus, onto_base
from shoal.ops.masks import bernoulli_mask

Rescale = Literal["inverse_density", "l1", "none"]


def dare_sparsify(
    delta: torch.Tensor, density: float, generator: torch.Generator, rescale: Rescale
) -> torch.Tensor:
    """Drop entries of one task vector with probability 1 − density and rescale the rest.

    ``"inverse_density"``: kept / density (the paper; unbiased entry by entry).
    ``"l1"``: kept · ‖τ‖₁ / ‖kept‖₁ — the task vector keeps its L1 norm (mergekit's
    convention; equal to the paper's in expectation). ``"none"``: no rescale.
    Density ≥ 1 keeps everything and draws nothing from ``generator``.
    """
    return _sparsify_(delta.clone(), density, generator, rescale)


def _sparsify_(
    delta: torch.Tensor, density: float, generator: torch.Generator, rescale: Rescale
) -> torch.Tensor:
    """:func:`dare_sparsify` overwriting ``delta`` (no new tensor per model: hot path)."""
    check_rescale(rescale, "DARE")
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    if delta.dtype == torch.float16 and delta.device.type == "cpu":
        # mergekit draws and rescales float16 task vectors on the CPU in float32
        return delta.copy_(_sparsify_(delta.float(), density, generator, rescale))
    full_norm = delta.abs().sum() if rescale == "l1" else None
    delta.mul_(bernoulli_mask(delta.shape, density, generator).to(delta.device))
    if rescale == "inverse_density":
        return delta.div_(density)
    if full_norm is not None:
        l1_rescale_(delta, full_norm)
    return delta


def dare(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    generator: torch.Generator,
    *,
    consensus: Consensus = "none",
    rescale: Rescale = "inverse_density",
    normalize: bool = False,
    lam: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """DARE merge of K fine-tuned tensors onto their base.

    τ̂_k = rescale(τ_k ⊙ m_k), m_k ~ Bernoulli(density_k) entry-wise, then
    θ = θ_base + Σ_k w_k τ̂_k (``consensus="none"``) or the TIES sign election and
    disjoint merge over the τ̂_k (``consensus="ties"``).

    Masks are drawn from ``generator`` model by model, in order.

    Args:
        base: the common ancestor's tensor.
        tensors: K fine-tuned tensors.
        weights: K weights.
        densities: K keep probabilities.
        generator: source of the drop masks.
        consensus: ``"none"`` (dare_linear) or ``"ties"`` (dare_ties).
        rescale: ``"inverse_density"`` (paper), ``"l1"`` (mergekit) or ``"none"``.
        normalize: divide by the (agreeing) weights.
        lam: scale λ of the merged task vector.
        dtype: the compute dtype (float32 unless given).

    Returns:
        tensor of the common shape in ``dtype``.
    """
    x, b, w, d = checked_sparse_inputs(base, tensors, weights, densities, dtype)
    deltas = x.sub_(b)  # x is a fresh stack: it becomes the task vectors, sparsified in turn
    for i in range(deltas.shape[0]):
        _sparsify_(deltas[i], d[i], generator, rescale)
    return onto_base(b, deltas, w, lam=lam, consensus=consensus, normalize=normalize)
