"""Model breadcrumbs (Davari & Belilovsky, 2024) — METHODS.md §1 ``breadcrumbs``.

Each task vector loses both tails: the largest-magnitude ``gamma`` fraction
(outliers) and the smallest entries, keeping a ``density`` fraction in between.
Counts follow mergekit's convention: keep ``int(density·n)`` entries after dropping
the top ``int(gamma·n)``; if ``density + gamma`` exceeds 1, fewer top entries are
dropped so that ``int(density·n)`` are still kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.ops._common import checked_sparse_inputs, per_model
from shoal.ops.consensus import Consensus, onto_base
from shoal.ops.masks import magnitudes, sorted_head, ties_at_cut, top_magnitudes


def breadcrumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Mask keeping the magnitude band below the top ``gamma`` fraction.

    Returns:
        bool tensor: entries ranked ``n_top .. n_top + n_keep − 1`` by |delta|
        (0 = largest), with ``n_keep = int(density·n)``,
        ``n_top = min(int(gamma·n), n − n_keep)``.
    """
    n = delta.numel()
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    n_keep = int(max(density, 0.0) * n)
    n_top = min(int(max(gamma, 0.0) * n), n - n_keep)
    mag = magnitudes(delta)  # once for both cuts
    if ties_at_cut(mag, n_top) or ties_at_cut(mag, n_top + n_keep):
        # tied entries straddle a cut: keep the ones mergekit keeps, positions
        # n_bot .. n_bot + n_keep - 1 of torch's default ascending sort
        n_bot = n - n_top - n_keep
        band = sorted_head(mag, n_bot + n_keep, descending=False)
        band ^= sorted_head(mag, n_bot, descending=False)
        return band.reshape(delta.shape)
    # without ties at the cuts the two top sets nest, so their XOR is the band
    return (top_magnitudes(mag, n_top + n_keep) ^ top_magnitudes(mag, n_top)).reshape(delta.shape)


def breadcrumbs(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    *,
    consensus: Consensus = "none",
    normalize: bool = False,
    lam: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Breadcrumbs merge: band-pass each task vector, then add them to the base.

    τ̂_k = τ_k ⊙ breadcrumbs_mask(τ_k, density_k, gamma_k);
    θ = θ_base + Σ_k w_k τ̂_k (``consensus="none"``, mergekit ``breadcrumbs``) or with
    TIES sign election (``consensus="ties"``, mergekit ``breadcrumbs_ties``).

    Args:
        base: the common ancestor's tensor.
        tensors: K fine-tuned tensors.
        weights: K weights.
        densities: K fractions to keep.
        gammas: K fractions of largest-magnitude entries to drop.
        consensus: ``"none"`` or ``"ties"``.
        normalize: divide by the (agreeing) weights.
        lam: scale λ of the merged task vector.
        dtype: the compute dtype (float32 unless given).

    Returns:
        tensor of the common shape in ``dtype``.
    """
    x, b, w, d = checked_sparse_inputs(base, tensors, weights, densities, dtype)
    k = x.shape[0]
    g = per_model(gammas, k, "gammas")
    deltas = x.sub_(b)  # x is a fresh stack: it becomes the task vectors, band-passed in place
    for i in range(k):
        deltas[i].mul_(breadcrumbs_mask(deltas[i], d[i], g[i]))  # faster than masked_fill_
    return onto_base(b, deltas, w, lam=lam, consensus=consensus, normalize=normalize)
