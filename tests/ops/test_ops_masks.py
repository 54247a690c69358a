"""Magnitude and Bernoulli masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal.ops import bernoulli_mask, magnitude_mask, topk_mask


def _numpy_topk(x: np.ndarray, k: int) -> np.ndarray:
    # independent reference: full stable sort by descending magnitude, ties by index
    order = np.argsort(-np.abs(x).reshape(-1), kind="stable")
    mask = np.zeros(x.size, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(x.shape)


def test_magnitude_mask_matches_sort_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 9, generator=g)
    for density in (0.0, 0.1, 0.33, 0.5, 0.99, 1.0):
        k = int(density * x.numel())
        np.testing.assert_array_equal(magnitude_mask(x, density).numpy(), _numpy_topk(x.numpy(), k))


def test_magnitude_mask_exact_count_with_ties() -> None:
    x = torch.tensor([1.0, -2.0, 2.0, 2.0, -2.0, 0.5, 3.0, 0.0])
    mask = topk_mask(x, 3)
    # 3.0 first, then the first two of the four |2.0| entries (index order)
    assert mask.tolist() == [False, True, True, False, False, False, True, False]
    np.testing.assert_array_equal(mask.numpy(), _numpy_topk(x.numpy(), 3))


def test_topk_masks_are_nested() -> None:
    x = torch.tensor([1.0, 2.0, 2.0, 2.0, 1.0, 2.0, 3.0])
    masks = [topk_mask(x, k) for k in range(x.numel() + 1)]
    for k in range(x.numel()):
        assert int(masks[k].sum()) == k
        assert bool((masks[k] & ~masks[k + 1]).sum() == 0)


def test_bernoulli_mask_determinism_and_rate() -> None:
    m1 = bernoulli_mask((200, 100), 0.3, torch.Generator().manual_seed(5))
    m2 = bernoulli_mask((200, 100), 0.3, torch.Generator().manual_seed(5))
    m3 = bernoulli_mask((200, 100), 0.3, torch.Generator().manual_seed(6))
    assert m1.dtype == torch.float32 and m1.shape == (200, 100)
    assert set(m1.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    # 20,000 draws: std of the rate is sqrt(.3*.7/2e4) ≈ 0.0032
    assert abs(m1.mean().item() - 0.3) < 0.02


@pytest.mark.parametrize("case", ["normal", "ties", "spike", "constant"])
def test_kth_smallest_equals_kthvalue_on_large_tensors(case: str) -> None:
    from shoal.ops.masks import kth_smallest

    gen = torch.Generator().manual_seed(3)
    n = (1 << 20) + 12345  # past the size where the histogram narrowing starts
    if case == "normal":
        v = torch.randn(n, generator=gen).abs()
    elif case == "ties":  # few distinct values: many entries share a bin edge
        v = torch.randint(0, 7, (n,), generator=gen).float() / 3
    elif case == "spike":  # one huge outlier squeezes everything into the first bin
        v = torch.rand(n, generator=gen)
        v[17] = 1e30
    else:
        v = torch.full((n,), 0.25)
    for rank in (1, 2, n // 3, n // 2 + 1, n - 1, n):
        assert kth_smallest(v, rank).item() == torch.kthvalue(v, rank).values.item()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_kth_smallest_with_nonfinite_entries_matches_kthvalue(bad: float) -> None:
    from shoal.ops.masks import kth_smallest

    v = torch.rand((1 << 20) + 7, generator=torch.Generator().manual_seed(2))
    v[123] = bad
    for rank in (1, v.numel() // 2, v.numel()):
        got, want = kth_smallest(v, rank), torch.kthvalue(v, rank).values
        assert torch.equal(got, want) or (got.isnan() and want.isnan())


def test_ties_at_the_cut_keep_the_head_of_torchs_default_sort() -> None:
    """Many entries share the magnitude at the cut (a task vector on a grid): exactly k
    are kept, every entry above the cut is among them, and the tied ones kept are the
    first in torch's default descending sort of the magnitudes (mergekit's argsort)."""
    from shoal.ops.masks import ties_at_cut

    gen = torch.Generator().manual_seed(4)
    x = torch.randint(-5, 6, (97, 61), generator=gen).float() * 2**-7
    mag = x.abs().reshape(-1)
    k = int(0.3 * x.numel())
    assert ties_at_cut(mag, k)
    mask = magnitude_mask(x, 0.3).reshape(-1)
    assert int(mask.sum()) == k
    threshold = mag[mask].min()
    assert bool(mask[mag > threshold].all()) and not bool(mask[mag < threshold].any())
    head = torch.argsort(mag, descending=True)[:k]
    expected = torch.zeros_like(mask)
    expected[head] = True
    assert torch.equal(mask, expected)
    # the stable (index-order) choice would keep other entries: the rule matters here
    stable = torch.zeros_like(mask)
    stable[torch.sort(mag, descending=True, stable=True).indices[:k]] = True
    assert not torch.equal(mask, stable)


def test_magnitude_mask_keeps_at_least_one_entry_for_a_positive_density() -> None:
    """mergekit keeps max(1, int(density · n)) entries; density 0 keeps none."""
    x = torch.tensor([0.1, -0.5, 0.2, 0.05])
    assert magnitude_mask(x, 0.1).tolist() == [False, True, False, False]
    assert not bool(magnitude_mask(x, 0.0).any())
