"""DELLA (Deep, Jain & Jain, 2024): magnitude-ranked random drops — METHODS.md §1 ``della``.

MagPrune: within each row, an entry's keep probability grows linearly with the rank
of its magnitude, from d − ε (smallest) to d + ε (largest), so that a row keeps a
``density`` fraction d in expectation and the large entries survive more often than in
DARE. ``della`` elects signs as TIES does, ``della_linear`` sums the task vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.errors import MergeError
from shoal.ops._common import check_rescale, checked_sparse_inputs, l1_rescale_, per_model
from shoal.ops.consensus import Consensus, onto_base
from shoal.ops.dare import Rescale


def _work_dtype(delta: torch.Tensor) -> torch.dtype:
    """The dtype the probabilities, draws and rescale use: the task vector's own, but
    float32 for float16 on the CPU (as mergekit, whose CPU draws need it)."""
    if delta.dtype == torch.float16 and delta.device.type == "cpu":
        return torch.float32
    return delta.dtype


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probability of every entry of one task vector.

    Rows are taken along dimension 1 (a 1-D tensor is one row). In a row of n entries,
    r_i ∈ {1..n} is the rank of |τ_i| (1 = smallest; ties in the order of torch's sort)
    and

        p_i = d − ε + 2ε · (r_i − 1)/(n − 1),

    so p runs linearly from d − ε to d + ε and averages d (a row of one entry keeps
    p = d). Ranks and p are computed in the task vector's dtype (float32 for float16 on
    the CPU), as mergekit does: in bfloat16 the ranks above 256 are rounded.

    Args:
        delta: a task vector (any shape).
        density: the mean keep probability d.
        epsilon: the half-width ε of the probability range.

    Returns:
        tensor of ``delta``'s shape in the work dtype.

    Raises:
        MergeError: d − ε ≤ 0 or d + ε ≥ 1 (p must lie in (0, 1)).
    """
    if not (density - epsilon > 0.0 and density + epsilon < 1.0):
        raise MergeError(
            f"della: density ± epsilon must lie in (0, 1), got density {density:g}, "
            f"epsilon {epsilon:g}"
        )
    work = _work_dtype(delta)
    rows = delta.unsqueeze(0) if delta.ndim < 2 else delta
    order = torch.argsort(rows.abs(), dim=1)
    # the rank of each entry is the inverse permutation of the sort order (+1)
    positions = torch.arange(rows.shape[1], device=rows.device).reshape(
        1, -1, *([1] * (rows.ndim - 2))
    )
    ranks = torch.empty_like(order).scatter_(1, order, positions.expand_as(order))
    ranks = ranks.to(work) + 1
    if rows.shape[1] == 1:
        scaled = torch.full_like(ranks, 0.5)
    else:
        low = ranks.amin(dim=1, keepdim=True)
        high = ranks.amax(dim=1, keepdim=True)
        scaled = ((ranks - low) / (high - low)).clamp(0, 1)
    probs = scaled * 2 * epsilon + (density - epsilon)
    return probs.reshape(delta.shape)


def della_sparsify(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: Rescale,
) -> torch.Tensor:
    """MagPrune one task vector: keep entry i with probability p_i, then rescale.

    p = :func:`della_probabilities`; the mask is u < p for ``numel`` uniforms u drawn
    from ``generator`` (on its device). Rescale: ``"l1"`` multiplies the kept entries by
    ‖τ‖₁ / ‖kept‖₁ (mergekit's ``rescale: true``; nothing when either norm is below
    1e-7); ``"inverse_density"`` divides each kept entry by its own p_i (the paper's
    1/p_i, unbiased entry by entry); ``"none"`` keeps them as they are. Density ≥ 1
    keeps everything and density ≤ 0 nothing; neither draws from ``generator``.

    Returns:
        a new tensor of ``delta``'s shape and dtype.
    """
    check_rescale(rescale, "DELLA")
    if density >= 1.0:
        return delta.clone()
    if density <= 0.0:
        return torch.zeros_like(delta)
    probs = della_probabilities(delta, density, epsilon)
    x = delta.to(probs.dtype)
    u = torch.rand(tuple(delta.shape), generator=generator, device=generator.device)
    keep = u.lt_(probs.to(u.device)).to(device=x.device, dtype=x.dtype)
    kept = x * keep
    if rescale == "inverse_density":
        kept = kept / probs
    elif rescale == "l1":
        l1_rescale_(kept, x.abs().sum())
    return kept.to(delta.dtype)


def della(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    epsilons: Sequence[float],
    generator: torch.Generator,
    *,
    consensus: Consensus = "ties",
    rescale: Rescale = "l1",
    normalize: bool = True,
    lam: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """DELLA merge of K fine-tuned tensors onto their base.

    τ̂_k = :func:`della_sparsify` (τ_k, d_k, ε_k), then the TIES sign election and
    disjoint merge over the w_k τ̂_k (``consensus="ties"``: mergekit's ``della``) or
    their plain sum (``"none"``: ``della_linear``), divided by the (agreeing) weights
    when ``normalize``; θ = θ_base + λ · merged delta.

    Masks are drawn from ``generator`` model by model, in order.

    Args:
        base: the common ancestor's tensor.
        tensors: K fine-tuned tensors.
        weights: K weights.
        densities: K mean keep probabilities d_k.
        epsilons: K half-widths ε_k of the keep probabilities.
        generator: source of the drop masks.
        consensus: ``"ties"`` (della) or ``"none"`` (della_linear).
        rescale: ``"l1"`` (mergekit), ``"inverse_density"`` (paper, 1/p_i) or ``"none"``.
        normalize: divide by the (agreeing) weights.
        lam: scale λ of the merged task vector.
        dtype: the compute dtype (float32 unless given).

    Returns:
        tensor of the common shape in ``dtype``.
    """
    x, b, w, d = checked_sparse_inputs(base, tensors, weights, densities, dtype)
    e = per_model(epsilons, x.shape[0], "epsilons")
    deltas = x.sub_(b)  # a fresh stack: it becomes the task vectors, sparsified in turn
    for i in range(deltas.shape[0]):
        deltas[i] = della_sparsify(deltas[i], d[i], e[i], generator, rescale)
    return onto_base(b, deltas, w, lam=lam, consensus=consensus, normalize=normalize)
