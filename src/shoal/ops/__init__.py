"""shoal.ops — the merge operators, as pure functions on tensors (METHODS.md §1).

Every operator takes the tensors of ONE parameter name (all of the same shape),
computes in float32 and returns float32 — or, given ``dtype=``, in that compute dtype
(the task-vector operators and those of mergekit 0.1.5's later methods, which match
mergekit bit for bit so); the caller casts back. Randomness comes
only from a ``torch.Generator`` argument. The operators know nothing of files,
models or search.

==================  ==========================================================
``linear``          Σ w_k θ_k / Σ w_k
``task_arithmetic`` θ_base + λ Σ w_k τ_k
``ties``            trim to top density, elect sign, disjoint merge
``dare``            random drop + rescale, then linear or TIES consensus
``slerp``           spherical interpolation, linear fallback when degenerate
``breadcrumbs``     drop largest ``gamma`` and smallest entries of each τ_k
``della``           drops with probabilities ranked by magnitude + rescale, linear or TIES
``model_stock``     mean of fine-tunes pulled toward the base by their angle
``karcher``         Riemannian mean of the directions × mean norm (no base)
``multislerp``      spherical barycentre of K models (or task vectors)
``nearswap``        base → other by min(1, t/|a − b|) per entry
``nuslerp``         SLERP of two models by weight, per tensor or per row
``sce``             select high-variance entries, energy weights, erase minority signs
``arcee_fusion``    the other model's changes of outlying importance (KL-weighted)
``splitpoint``      M2N2 crossover: SLERP t = w_m before the split, 1 − w_m after
``svd_mutation``    CycleQD: θ + U diag(w ⊙ σ) Vᵀ, w ~ U[0, w_max]
==================  ==========================================================

:data:`OPERATORS` maps recipe method names (mergekit's where they exist) to the
functions; ``dare_linear`` / ``dare_ties`` / ``breadcrumbs_ties`` / ``della`` /
``della_linear`` are ``dare``, ``breadcrumbs`` and ``della`` with the consensus fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from shoal.ops.arcee_fusion import arcee_fusion, fusion_importance, fusion_threshold
from shoal.ops.breadcrumbs import breadcrumbs, breadcrumbs_mask
from shoal.ops.consensus import combine, elect_sign
from shoal.ops.dare import dare, dare_sparsify
from shoal.ops.della import della, della_probabilities, della_sparsify
from shoal.ops.karcher import karcher
from shoal.ops.linear import linear
from shoal.ops.masks import bernoulli_mask, magnitude_mask, topk_mask
from shoal.ops.model_stock import model_stock, model_stock_ratio
from shoal.ops.multislerp import multislerp
from shoal.ops.nearswap import nearswap
from shoal.ops.nuslerp import nuslerp, nuslerp_merge, nuslerp_t
from shoal.ops.sce import sce, sce_mask, sce_weights
from shoal.ops.slerp import cosine, slerp
from shoal.ops.splitpoint import splitpoint, splitpoint_flat
from shoal.ops.svd_mutation import svd_mutation, svd_mutation_for
from shoal.ops.task_arithmetic import task_arithmetic
from shoal.ops.ties import ties

OPERATORS: dict[str, Callable[..., torch.Tensor]] = {
    "linear": linear,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare": dare,
    "dare_linear": partial(dare, consensus="none"),
    "dare_ties": partial(dare, consensus="ties"),
    "slerp": slerp,
    "della": partial(della, consensus="ties"),
    "della_linear": partial(della, consensus="none", normalize=False),
    "breadcrumbs": partial(breadcrumbs, consensus="none"),
    "breadcrumbs_ties": partial(breadcrumbs, consensus="ties"),
    "model_stock": model_stock,
    "karcher": karcher,
    "multislerp": multislerp,
    "nearswap": nearswap,
    "nuslerp": nuslerp_merge,
    "sce": sce,
    "splitpoint": splitpoint,
    "svd_mutation": svd_mutation_for,
    "arcee_fusion": arcee_fusion,
}
"""Operator name → function (the names used in recipes)."""

__all__ = [
    "OPERATORS",
    "arcee_fusion",
    "bernoulli_mask",
    "breadcrumbs",
    "breadcrumbs_mask",
    "combine",
    "cosine",
    "dare",
    "dare_sparsify",
    "della",
    "della_probabilities",
    "della_sparsify",
    "elect_sign",
    "fusion_importance",
    "fusion_threshold",
    "karcher",
    "linear",
    "magnitude_mask",
    "model_stock",
    "model_stock_ratio",
    "multislerp",
    "nearswap",
    "nuslerp",
    "nuslerp_merge",
    "nuslerp_t",
    "sce",
    "sce_mask",
    "sce_weights",
    "slerp",
    "splitpoint",
    "splitpoint_flat",
    "svd_mutation",
    "svd_mutation_for",
    "task_arithmetic",
    "ties",
    "topk_mask",
]
