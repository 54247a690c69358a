"""Arcee Fusion: the importance and the quartile threshold by hand, and the fusion's
properties."""

from __future__ import annotations

import math

import pytest
import torch

from shoal.errors import MergeError
from shoal.ops import OPERATORS, arcee_fusion, fusion_importance, fusion_threshold


def test_importance_by_hand() -> None:
    # softmax([ln 3, 0]) = [3/4, 1/4], softmax([0, 0]) = [1/2, 1/2]:
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2); importance = |Δ| · KL = [ln 3 · KL, 0]
    base = torch.tensor([0.0, 0.0])
    other = torch.tensor([math.log(3.0), 0.0])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    torch.testing.assert_close(fusion_importance(base, other), torch.tensor([math.log(3) * kl, 0]))
    # one KL per row (last dimension): the unchanged row has importance 0
    rows = fusion_importance(torch.zeros(2, 2), torch.stack([other, base]))
    torch.testing.assert_close(rows, torch.tensor([[math.log(3) * kl, 0.0], [0.0, 0.0]]))


def test_threshold_by_hand() -> None:
    # n = 10: quartiles at positions ⌊9/4⌋ = 2, ⌊9/2⌋ = 4, ⌊27/4⌋ = 6 of the sorted values
    values = torch.tensor([9.0, 1, 100, 3, 0, 5, 2, 7, 4, 6])  # sorted: 0..7, 9, 100
    # Q1 = 2, median = 4, Q3 = 6: 4 + 1.5 · 4 = 10
    assert float(fusion_threshold(values)) == 10.0
    assert float(fusion_threshold(torch.arange(9.0).reshape(3, 3))) == 10.0  # 2, 4, 6 again
    assert float(fusion_threshold(torch.tensor([5.0]))) == 5.0
    with pytest.raises(MergeError, match="empty"):
        fusion_threshold(torch.zeros(0))


def test_fusion_by_hand_takes_the_outlying_change() -> None:
    """A 1-D tensor is one row: one KL for all entries, so the mask is |Δ| ≥ median +
    1.5 IQR of |Δ|: of changes 0.01 … 0.09 and 1.0 (threshold 0.05 + 1.5 · 0.04 = 0.11)
    only 1.0 is taken."""
    base = torch.zeros(10)
    other = torch.tensor([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 1.0])
    expected = torch.zeros(10)
    expected[-1] = 1.0
    torch.testing.assert_close(arcee_fusion(base, other), expected)


def test_fusion_takes_either_value_and_only_outliers() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(30, 40, generator=g)
    other = base + 0.01 * torch.randn(30, 40, generator=g)
    out = arcee_fusion(base, other)
    took = out == other
    assert bool((took | (out == base)).all())  # every entry is the base's or the other's
    importance = fusion_importance(base, other)
    assert torch.equal(took & (other != base), (importance >= fusion_threshold(importance)))
    assert 0.0 < float(took.float().mean()) < 0.2  # outliers only
    assert torch.equal(arcee_fusion(base, base.clone()), base)  # nothing to take


def test_large_tensors_use_exact_quartiles() -> None:
    """Past 2²⁰ entries the quartiles are still the exact order statistics (mergekit
    estimates them from a random sample of 10⁶ there)."""
    values = torch.rand(1_200_001, generator=torch.Generator().manual_seed(1))
    ordered = values.sort().values
    n = values.numel()
    q1, med, q3 = (ordered[k * (n - 1) // 4] for k in (1, 2, 3))
    assert float(fusion_threshold(values)) == float(med + 1.5 * (q3 - q1))


def test_dtype_and_shapes() -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(8, 16, generator=g)
    other = base + 0.05 * torch.randn(8, 16, generator=g)
    out = arcee_fusion(base, other, dtype=torch.bfloat16)
    assert out.dtype == torch.float32  # the float mask promotes the sum (as mergekit's)
    a, b = base.bfloat16().float(), other.bfloat16().float()
    kept = out == a
    assert 0 < int(kept.sum()) < out.numel()
    # a taken entry is a + bf16(b − a), summed in float32: b up to the rounding of the change
    torch.testing.assert_close(out[~kept], b[~kept], atol=1e-3, rtol=0)
    with pytest.raises(MergeError, match="shape mismatch"):
        arcee_fusion(base, other[:2])
    assert OPERATORS["arcee_fusion"] is arcee_fusion
