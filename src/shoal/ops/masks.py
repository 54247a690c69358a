"""Sparsification masks: keep the largest entries, or a random subset.

Used by TIES (magnitude), DARE (Bernoulli) and breadcrumbs (magnitude band).
"""

from __future__ import annotations

import math

import torch


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly ``k`` entries of ``x`` with the largest ``|x|``.

    The threshold comes from ``kthvalue`` (selection, not a full sort). Entries tied
    at the threshold are taken in flattened index order, so masks for growing ``k``
    are nested: ``topk_mask(x, j) ⊆ topk_mask(x, k)`` for ``j ≤ k``.

    Args:
        x: any tensor.
        k: how many entries to keep (clamped to ``[0, numel]``).

    Returns:
        bool tensor of ``x``'s shape.
    """
    return top_magnitudes(magnitudes(x), k).reshape(x.shape)


def magnitudes(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` flattened, in float32: the input of :func:`top_magnitudes`."""
    return x.detach().abs().reshape(-1).to(torch.float32)


def top_magnitudes(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Flat mask of the ``k`` largest entries of the flat ``mag`` (see :func:`topk_mask`).

    Callers that need several masks of one tensor (breadcrumbs' band) take the
    magnitudes once and call this for each count.
    """
    n = mag.numel()
    k = max(0, min(int(k), n))
    if k == n:
        return torch.ones_like(mag, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(mag, dtype=torch.bool)
    # the k-th largest is the (n - k + 1)-th smallest
    threshold = kth_smallest(mag, n - k + 1)
    above = mag > threshold
    missing = k - int(above.sum())
    tied = (mag == threshold).nonzero().reshape(-1)[:missing]
    above[tied] = True
    return above


# below this many entries torch.kthvalue alone is as fast as narrowing first
_NARROW_FROM = 1 << 20
_BINS = 4096


def kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank``-th smallest entry (1-based) of a flat float tensor, exactly.

    ``torch.kthvalue`` is exact but single-threaded and slow on tens of millions of
    entries. For large tensors a histogram (a vectorised, multi-threaded pass) finds the
    bin that holds the answer; exact comparisons then count the entries below the bin
    and ``kthvalue`` runs on the bin's entries only. If the histogram's binning and
    the comparisons disagree at a bin edge (rounding), the guess is rejected and the
    plain ``kthvalue`` answers, so the result is always the exact order statistic.
    """
    n = values.numel()
    if n < _NARROW_FROM:
        return torch.kthvalue(values, rank).values
    lo_t, hi_t = torch.aminmax(values)
    lo, hi = float(lo_t), float(hi_t)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # histc needs a finite range
        return torch.kthvalue(values, rank).values
    if not lo < hi:
        return values.new_tensor(lo)
    counts = torch.histc(values, bins=_BINS, min=lo, max=hi).cumsum(0)
    b = int(torch.searchsorted(counts, counts.new_tensor(float(rank))))
    width = (hi - lo) / _BINS
    low_edge = lo + b * width if b > 0 else -float("inf")
    high_edge = lo + (b + 1) * width if b < _BINS - 1 else float("inf")
    below = int((values < low_edge).sum())
    inside = values[(values >= low_edge) & (values < high_edge)]
    if below < rank <= below + inside.numel():
        return torch.kthvalue(inside, rank - below).values
    return torch.kthvalue(values, rank).values  # rounding at an edge: the plain way


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of entries by magnitude.

    The count kept is ``int(density * numel)`` (rounded down, as mergekit does).

    Args:
        delta: a task vector (any shape).
        density: fraction in ``[0, 1]`` to keep.

    Returns:
        bool tensor of ``delta``'s shape.
    """
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    return topk_mask(delta, int(max(density, 0.0) * delta.numel()))


def bernoulli_mask(
    shape: torch.Size | tuple[int, ...], density: float, generator: torch.Generator
) -> torch.Tensor:
    """Keep each entry independently with probability ``density``.

    Draws ``numel`` uniforms u from ``generator`` (on the generator's device) and keeps
    the entries with u < density, so the same generator state gives the same mask.
    The mask is float32 ones and zeros, ready to multiply: on the CPU, multiplying by
    a float mask is several times faster than bool masking (``masked_fill_``,
    ``torch.where``), and DARE draws one mask per model per tensor per candidate.

    Args:
        shape: shape of the mask.
        density: keep probability in ``[0, 1]``.
        generator: the source of randomness.

    Returns:
        float32 tensor of ``shape``, 1.0 where kept and 0.0 where dropped.
    """
    u = torch.rand(tuple(shape), generator=generator, device=generator.device)
    return u.lt_(density)  # in place: the uniforms become the 0/1 mask
