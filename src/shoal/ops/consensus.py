"""Combining sparsified task vectors, with or without TIES sign election.

Shared by TIES, DARE and breadcrumbs (METHODS.md §1 ``ties``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from shoal.errors import MergeError
from shoal.ops._common import safe_divide, weight_column

Majority = Literal["sum", "count"]
Consensus = Literal["none", "ties"]


def elect_sign(weighted: torch.Tensor, majority: Majority = "sum") -> torch.Tensor:
    """Per-entry elected sign (±1) of ``K`` weighted task vectors ``(K, *shape)``.

    ``"sum"``: sign(Σ_k w_k τ̂_k) (TIES paper); ``"count"``: sign of the number of
    positive minus negative entries. A zero total elects +1 (mergekit's convention).
    """
    if majority == "sum":
        total = weighted.sum(0)
    elif majority == "count":
        total = weighted.sign().sum(0)
    else:
        raise MergeError(f"unknown sign majority {majority!r} (expected 'sum' or 'count')")
    return total.ge_(0).mul_(2).sub_(1)  # in place on the fresh total: 1.0 or -1.0


# entries combined at a time: every step is entry-wise, so working through a large
# tensor in chunks gives the same numbers while the K-fold temporaries stay small
CHUNK = 1 << 20


def onto_base(
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights: Sequence[float],
    *,
    lam: float = 1.0,
    consensus: Consensus,
    normalize: bool,
    majority: Majority = "sum",
) -> torch.Tensor:
    """θ = θ_base + λ · :func:`combine` (deltas): the last step every task-vector merge
    (TIES, DARE, DELLA, breadcrumbs) shares. Works in place on the combined delta."""
    merged = combine(deltas, weights, consensus=consensus, normalize=normalize, majority=majority)
    if lam != 1.0:
        merged.mul_(lam)
    return merged.add_(base)


def combine(
    deltas: torch.Tensor,
    weights: Sequence[float],
    *,
    consensus: Consensus,
    normalize: bool,
    majority: Majority = "sum",
    chunk: int = CHUNK,
) -> torch.Tensor:
    """Merge sparsified task vectors ``(K, *shape)`` into one delta.

    ``consensus="ties"``: keep entries whose weighted sign agrees with the elected
    sign; the divisor (when ``normalize``) is the per-entry sum of the agreeing
    models' weights. ``consensus="none"``: plain weighted sum; the divisor is Σ_k w_k.
    Where no model agrees (TIES divisor exactly 0) or Σ_k w_k is below 1e-8 in
    magnitude, the divisor is replaced by 1 (mergekit's guards).

    Tensors of more than ``chunk`` entries are combined ``chunk`` entries at a time.
    """
    if deltas[0].numel() <= chunk:
        return _combine(deltas, weights, consensus, normalize, majority)
    flat = deltas.reshape(deltas.shape[0], -1)
    out = torch.empty(flat.shape[1], dtype=flat.dtype, device=flat.device)
    for start in range(0, flat.shape[1], chunk):
        part = flat[:, start : start + chunk]
        out[start : start + chunk] = _combine(part, weights, consensus, normalize, majority)
    return out.reshape(deltas.shape[1:])


def _combine(
    deltas: torch.Tensor,
    weights: Sequence[float],
    consensus: Consensus,
    normalize: bool,
    majority: Majority,
) -> torch.Tensor:
    w = weight_column(list(weights), deltas.ndim - 1, deltas.device, deltas.dtype)
    weighted = w * deltas
    if consensus == "none":
        merged = weighted.sum(0)
        return safe_divide(merged, w.sum(0).expand_as(merged)) if normalize else merged
    if consensus != "ties":
        raise MergeError(f"unknown consensus {consensus!r} (expected 'none' or 'ties')")
    # Entries of the losing sign and zeros drop out, so the agreeing sum is the sum of
    # the positive parts where +1 is elected and of the negative parts elsewhere. The
    # selections are products with 0/1 float masks, not torch.where: the same bits
    # (x·1 + y·0 = x), several times faster on the CPU, and this is the search loop's
    # hot path.
    plus = elect_sign(weighted, majority).gt_(0)  # 1.0 where +1 is elected
    minus = 1.0 - plus
    merged = weighted.clamp(min=0).sum(0).mul_(plus) + weighted.clamp(max=0).sum(0).mul_(minus)
    if not normalize:
        return merged
    # divisor: the summed weights of the models whose entry has the elected sign
    # (zero entries agree with nothing); mergekit guards only an exact zero
    signs = weighted.sign()
    divisor = (w * signs.clamp(min=0)).sum(0).mul_(plus) - (w * signs.clamp(max=0)).sum(0).mul_(
        minus
    )
    divisor += divisor.eq(0)
    return merged / divisor
