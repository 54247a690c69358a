"""DARE: expectation, determinism, the L1 convention, and agreement with TIES."""

from __future__ import annotations

import numpy as np
import torch

from shoal.ops import dare, dare_sparsify, task_arithmetic, ties


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 4, generator=g)
    xs = [base + torch.randn(6, 4, generator=g) for _ in range(2)]
    return base, xs


def test_dare_is_unbiased_for_task_arithmetic() -> None:
    base, xs = _setup()
    w, d = [0.6, 0.9], [0.5, 0.3]
    g = torch.Generator().manual_seed(1)
    n = 4000
    mean = sum(dare(base, xs, w, d, g) for _ in range(n)) / n
    expected = task_arithmetic(base, xs, w)
    # per-entry std of one draw ≤ Σ|w τ| sqrt((1-d)/d) ≈ 5; of the mean ≈ 0.08
    assert float((mean - expected).abs().max()) < 0.4
    assert float((mean - expected).abs().mean()) < 0.08


def test_dare_matches_formula_with_same_masks() -> None:
    base, xs = _setup(2)
    w, d = [1.0, 0.5], [0.4, 0.7]
    out = dare(base, xs, w, d, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)  # masks are drawn model by model, in order
    ref = base.numpy().astype(np.float64)
    for wk, dk, x in zip(w, d, xs, strict=True):
        keep = (torch.rand(base.shape, generator=g) < dk).numpy()
        ref = ref + wk * np.where(keep, (x - base).numpy() / dk, 0.0)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_dare_determinism() -> None:
    base, xs = _setup(3)
    a = dare(base, xs, [1, 1], [0.5, 0.5], torch.Generator().manual_seed(4), consensus="ties")
    b = dare(base, xs, [1, 1], [0.5, 0.5], torch.Generator().manual_seed(4), consensus="ties")
    c = dare(base, xs, [1, 1], [0.5, 0.5], torch.Generator().manual_seed(5), consensus="ties")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_l1_rescale_keeps_the_norm() -> None:
    tau = torch.randn(50, 20, generator=torch.Generator().manual_seed(6))
    out = dare_sparsify(tau, 0.3, torch.Generator().manual_seed(7), "l1")
    assert 0.2 < float((out != 0).float().mean()) < 0.4
    torch.testing.assert_close(out.abs().sum(), tau.abs().sum())
    kept = out != 0
    ratio = out[kept] / tau[kept]  # one common factor
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))


def test_full_density_dare_ties_is_ties_and_dare_linear_is_task_arithmetic() -> None:
    base, xs = _setup(8)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(
        dare(base, xs, [0.3, 0.9], [1.0, 1.0], g, consensus="ties", normalize=True),
        ties(base, xs, [0.3, 0.9], [1.0, 1.0]),
    )
    torch.testing.assert_close(
        dare(base, xs, [0.3, 0.9], [1.0, 1.0], g), task_arithmetic(base, xs, [0.3, 0.9])
    )
