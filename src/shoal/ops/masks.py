"""Sparsification masks: keep the largest entries, or a random subset.

Used by TIES (magnitude), DARE (Bernoulli) and breadcrumbs (magnitude band).
"""

from __future__ import annotations

import math

import torch


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly ``k`` entries of ``x`` with the largest ``|x|``.

    The threshold comes from ``kthvalue`` (selection, not a full sort). When more
    entries share the magnitude at the cut than places are left, the ones kept are the
    first among them in the order of torch's default (unstable) descending sort of the
    float32 magnitudes — the entries mergekit keeps, whose magnitude mask is the head of
    that sort. For tensors of at most 16 entries that order is the flattened index
    order; for larger ones it follows the sort algorithm, so with ties masks for
    growing ``k`` need not be nested.

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
    at_cut = mag == threshold
    missing = k - int(above.sum())
    if int(at_cut.sum()) == missing:  # no choice among tied entries
        return above.logical_or_(at_cut)
    return sorted_head(mag, k)


def sorted_head(mag: torch.Tensor, k: int, *, descending: bool = True) -> torch.Tensor:
    """Flat mask of the first ``k`` entries of torch's default sort of ``mag``.

    The tie rule of :func:`top_magnitudes` (and, ascending, of breadcrumbs' band):
    the order torch's unstable ``sort`` gives on the CPU, which is the order
    mergekit's ``argsort`` of the same float32 magnitudes gives.
    """
    order = torch.sort(mag.cpu(), descending=descending, stable=False).indices[:k]
    mask = torch.zeros(mag.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.to(mag.device)


def ties_at_cut(mag: torch.Tensor, k: int) -> bool:
    """Whether choosing the ``k`` largest of ``mag`` means choosing among tied entries."""
    n = mag.numel()
    if k <= 0 or k >= n:
        return False
    threshold = kth_smallest(mag, n - k + 1)
    return int((mag > threshold).sum()) + int((mag == threshold).sum()) != k


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

    The count kept is ``int(density * numel)`` (rounded down), but at least one entry
    for any positive density (mergekit 0.1.5 does both); density ≤ 0 keeps nothing.

    Args:
        delta: a task vector (any shape).
        density: fraction in ``[0, 1]`` to keep.

    Returns:
        bool tensor of ``delta``'s shape.
    """
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0.0 or delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    return topk_mask(delta, max(1, int(density * delta.numel())))


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
