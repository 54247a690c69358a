"""NearSwap: by hand, its limits in t, and the step it takes toward the other model."""

from __future__ import annotations

import pytest
import torch

from shoal.errors import MergeError
from shoal.ops import OPERATORS, nearswap


def test_nearswap_by_hand() -> None:
    a = torch.tensor([0.0, 0.0, 0.0, 1.0])
    b = torch.tensor([0.05, 0.2, -1.0, 1.0])
    # |a − b| = [0.05, 0.2, 1, 0 → 1e-6]; t = 0.1: w = [1, 0.5, 0.1, 1]
    out = nearswap(a, b, 0.1)
    torch.testing.assert_close(out, torch.tensor([0.05, 0.1, -0.1, 1.0]))


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(20, 30, generator=g)
    return a, a + 0.1 * torch.randn(20, 30, generator=g)


def test_limits_in_t() -> None:
    a, b = _pair()
    assert torch.equal(nearswap(a, b, 0.0), a)
    torch.testing.assert_close(nearswap(a, b, 1e9), b)
    # t at least the largest distance: every entry is swapped
    big = float((a - b).abs().max())
    torch.testing.assert_close(nearswap(a, b, big), b)


def test_each_entry_moves_by_t_or_all_the_way() -> None:
    """|θ − a| = min(|b − a|, t), toward b."""
    a, b = _pair(1)
    t = 0.05
    out = nearswap(a, b, t)
    step = (out - a).abs()
    torch.testing.assert_close(step, torch.minimum((b - a).abs(), torch.tensor(t)))
    moved = step > 0
    assert bool((torch.sign(out - a)[moved] == torch.sign(b - a)[moved]).all())
    # symmetric in the two models: θ(a, b) + θ(b, a) = a + b
    torch.testing.assert_close(out + nearswap(b, a, t), a + b)


def test_dtype_and_shapes() -> None:
    a, b = _pair(2)
    out = nearswap(a, b, 0.05, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), nearswap(a, b, 0.05), atol=0.02, rtol=0.02)
    with pytest.raises(MergeError, match="shape mismatch"):
        nearswap(a, b[:3], 0.1)
    assert OPERATORS["nearswap"] is nearswap
