"""Breadcrumbs' magnitude band and Model Stock's ratio."""

from __future__ import annotations

import math

import numpy as np
import torch

from shoal.ops import breadcrumbs, breadcrumbs_mask, model_stock, ties


def test_breadcrumbs_mask_hand_example() -> None:
    x = torch.tensor([3.0, -10.0, 1.0, 7.0, -4.0, 9.0, 2.0, 5.0, -6.0, 8.0])
    # drop top 2 (|10|, |9|), keep the next 5 (8, 7, 6, 5, 4), drop 3, 2, 1
    kept = x[breadcrumbs_mask(x, 0.5, 0.2)]
    assert sorted(kept.abs().tolist()) == [4.0, 5.0, 6.0, 7.0, 8.0]
    # density + gamma > 1: keep 9 entries, so only the single largest goes
    kept = x[breadcrumbs_mask(x, 0.9, 0.2)]
    assert sorted(kept.abs().tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]


def test_breadcrumbs_matches_sort_reference() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 8, generator=g)
    xs = [base + torch.randn(5, 8, generator=g) for _ in range(2)]
    w, d, gam = [0.8, 0.5], [0.4, 0.5], [0.1, 0.05]
    ref = base.numpy().astype(np.float64).copy()
    for wk, dk, gk, x in zip(w, d, gam, xs, strict=True):
        tau = (x - base).numpy().reshape(-1)
        order = np.argsort(-np.abs(tau), kind="stable")
        n_top, n_keep = int(gk * tau.size), int(dk * tau.size)
        keep = np.zeros(tau.size, dtype=bool)
        keep[order[n_top : n_top + n_keep]] = True
        ref += wk * np.where(keep, tau, 0.0).reshape(base.shape)
    np.testing.assert_allclose(breadcrumbs(base, xs, w, d, gam).numpy(), ref, atol=1e-5)


def test_breadcrumbs_ties_without_pruning_is_ties() -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(20, generator=g)
    xs = [base + torch.randn(20, generator=g) for _ in range(3)]
    torch.testing.assert_close(
        breadcrumbs(base, xs, [1, 1, 1], [1, 1, 1], [0, 0, 0], consensus="ties", normalize=True),
        ties(base, xs, [1, 1, 1], [1, 1, 1]),
    )


def test_model_stock_with_itself_is_the_model() -> None:
    g = torch.Generator().manual_seed(2)
    base, x = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    torch.testing.assert_close(model_stock(base, [x, x, x]), x)


def test_model_stock_ratio_by_hand() -> None:
    base = torch.tensor([1.0, 1.0, 1.0])
    # deltas at 60 degrees: cos = 0.5, N = 2 -> t = 2*0.5 / (1 + 0.5) = 2/3
    d1 = torch.tensor([1.0, 0.0, 0.0])
    d2 = torch.tensor([0.5, math.sqrt(3) / 2, 0.0])
    out = model_stock(base, [base + d1, base + d2])
    mean = base + (d1 + d2) / 2
    torch.testing.assert_close(out, (2 / 3) * mean + (1 / 3) * base)
    # orthogonal deltas: t = 0, the base comes back
    out = model_stock(base, [base + d1, base + torch.tensor([0.0, 0.0, 2.0])])
    torch.testing.assert_close(out, base)


def test_model_stock_filter_wise_is_row_by_row() -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 6, generator=g)
    xs = [base + torch.randn(4, 6, generator=g) for _ in range(3)]
    out = model_stock(base, xs, filter_wise=True)
    for r in range(4):  # each row merged on its own equals the whole-tensor rule on that row
        torch.testing.assert_close(out[r], model_stock(base[r], [x[r] for x in xs]))
    assert not torch.allclose(out, model_stock(base, xs))


def test_ties_divisor_guard_only_where_no_model_agrees() -> None:
    base = torch.zeros(2)
    # entry 0: both models zero -> no agreeing model -> 0; entry 1: weights 1 and -1 ...
    a = torch.tensor([0.0, 2.0])
    b = torch.tensor([0.0, -2.0])
    out = ties(base, [a, b], [1.0, -1.0], [1.0, 1.0])
    # weighted deltas [0, 2] and [0, 2]: both agree (+), divisor 1 + (-1) = 0 -> kept as 4
    torch.testing.assert_close(out, torch.tensor([0.0, 4.0]))
