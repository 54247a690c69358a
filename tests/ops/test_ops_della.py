"""DELLA: the keep probabilities by hand, the drops by their frequencies, the rescales,
and the limits where DELLA is DARE, TIES or task arithmetic."""

from __future__ import annotations

import pytest
import torch

from shoal.errors import MergeError
from shoal.ops import (
    OPERATORS,
    dare,
    della,
    della_probabilities,
    della_sparsify,
    task_arithmetic,
    ties,
)


def test_probabilities_by_hand() -> None:
    # |τ| = [0.1, 3, 2, 0.5]: ranks [1, 4, 3, 2], (r − 1)/(n − 1) = [0, 1, 2/3, 1/3]
    # d = 0.5, ε = 0.2: p = 0.3 + 0.4 · [0, 1, 2/3, 1/3]
    tau = torch.tensor([0.1, -3.0, 2.0, 0.5])
    expected = torch.tensor([0.3, 0.7, 0.3 + 0.4 * 2 / 3, 0.3 + 0.4 / 3])
    torch.testing.assert_close(della_probabilities(tau, 0.5, 0.2), expected)
    # rows along dimension 1, each ranked on its own
    rows = torch.stack([tau, -tau.flip(0)])
    probs = della_probabilities(rows, 0.5, 0.2)
    torch.testing.assert_close(probs[0], expected)
    torch.testing.assert_close(probs[1], expected.flip(0))
    # a row of one entry keeps the density
    single = della_probabilities(torch.ones(3, 1), 0.4, 0.1)
    torch.testing.assert_close(single, torch.full((3, 1), 0.4))


def test_probabilities_average_the_density_and_follow_the_magnitudes() -> None:
    tau = torch.randn(8, 101, generator=torch.Generator().manual_seed(0))
    probs = della_probabilities(tau, 0.3, 0.1)
    torch.testing.assert_close(probs.mean(dim=1), torch.full((8,), 0.3))
    assert float(probs.min()) == pytest.approx(0.2) and float(probs.max()) == pytest.approx(0.4)
    order = tau.abs().argsort(dim=1)
    assert bool((probs.gather(1, order).diff(dim=1) > 0).all())  # larger |τ|, larger p


@pytest.mark.parametrize(("density", "epsilon"), [(0.1, 0.15), (0.9, 0.1), (0.5, 0.5)])
def test_density_plus_minus_epsilon_must_lie_inside_0_1(density: float, epsilon: float) -> None:
    tau = torch.randn(4, 5)
    with pytest.raises(MergeError, match="density ± epsilon"):
        della_sparsify(tau, density, epsilon, torch.Generator().manual_seed(0), "l1")


def test_keep_frequencies_are_the_probabilities() -> None:
    """Over 4000 seeded draws each entry is kept with frequency p_i (binomial standard
    error ≤ 0.008; bound 0.04 = 5 standard errors), and a draw keeps d · n entries on
    average."""
    tau = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    probs = della_probabilities(tau, 0.4, 0.25)
    g = torch.Generator().manual_seed(2)
    draws = 4000
    kept = torch.zeros_like(tau)
    for _ in range(draws):
        kept += della_sparsify(tau, 0.4, 0.25, g, "none") != 0
    freq = kept / draws
    assert float((freq - probs).abs().max()) < 0.04
    assert float(freq.mean()) == pytest.approx(0.4, abs=0.005)


def test_rescales() -> None:
    tau = torch.randn(30, 20, generator=torch.Generator().manual_seed(3))
    # l1: the kept entries share one factor and the norm is kept
    out = della_sparsify(tau, 0.3, 0.1, torch.Generator().manual_seed(4), "l1")
    torch.testing.assert_close(out.abs().sum(), tau.abs().sum())
    kept = out != 0
    ratio = out[kept] / tau[kept]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])))
    # none: the kept entries unchanged; inverse_density: each divided by its own p_i
    plain = della_sparsify(tau, 0.3, 0.1, torch.Generator().manual_seed(4), "none")
    assert torch.equal(plain != 0, kept) and torch.equal(plain[kept], tau[kept])
    inv = della_sparsify(tau, 0.3, 0.1, torch.Generator().manual_seed(4), "inverse_density")
    probs = della_probabilities(tau, 0.3, 0.1)
    torch.testing.assert_close(inv[kept], tau[kept] / probs[kept])
    with pytest.raises(MergeError, match="rescale"):
        della_sparsify(tau, 0.3, 0.1, torch.Generator(), "l2")  # type: ignore[arg-type]


def test_inverse_density_is_unbiased() -> None:
    tau = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    n = 4000
    mean = sum(della_sparsify(tau, 0.5, 0.3, g, "inverse_density") for _ in range(n)) / n
    # per-entry std of one draw ≤ |τ| sqrt((1 − p)/p) ≤ 1.6 |τ|; of the mean ≤ 0.03 |τ|
    assert float(((mean - tau).abs() / tau.abs()).max()) < 0.15


def test_full_and_empty_density_draw_nothing() -> None:
    tau = torch.randn(5, 5)
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    assert torch.equal(della_sparsify(tau, 1.0, 0.9, g, "l1"), tau)
    assert not della_sparsify(tau, 0.0, 0.9, g, "l1").any()
    assert torch.equal(g.get_state(), state)


def _setup(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(12, 9, generator=g)
    return base, [base + torch.randn(12, 9, generator=g) for _ in range(3)]


@pytest.mark.parametrize(("consensus", "rescale"), [("ties", "l1"), ("none", "inverse_density")])
def test_zero_epsilon_is_dare_with_the_same_draws(consensus: str, rescale: str) -> None:
    """ε = 0 makes every p_i = d: DARE's Bernoulli(d) masks, from the same uniforms."""
    base, xs = _setup(8)
    w, d = [0.7, 0.4, 1.0], [0.3, 0.6, 0.5]
    ours = della(
        base, xs, w, d, [0.0] * 3, torch.Generator().manual_seed(9),
        consensus=consensus, rescale=rescale, normalize=True,
    )  # fmt: skip
    theirs = dare(
        base, xs, w, d, torch.Generator().manual_seed(9),
        consensus=consensus, rescale=rescale, normalize=True,
    )  # fmt: skip
    torch.testing.assert_close(ours, theirs)


def test_full_density_is_ties_or_task_arithmetic() -> None:
    base, xs = _setup(10)
    w = [0.3, 0.9, 0.5]
    g = torch.Generator().manual_seed(0)
    ones, eps = [1.0] * 3, [0.15] * 3
    torch.testing.assert_close(della(base, xs, w, ones, eps, g), ties(base, xs, w, ones))
    torch.testing.assert_close(
        OPERATORS["della_linear"](base, xs, w, ones, eps, g, lam=0.5),
        task_arithmetic(base, xs, w, lam=0.5),
    )


def test_della_merge_by_hand_with_the_same_masks() -> None:
    """della_linear with rescale none: θ_b + Σ w_k (τ_k ⊙ m_k), the masks drawn model by
    model from the generator."""
    base, xs = _setup(11)
    w, d, e = [1.0, 0.5, 0.25], [0.4, 0.5, 0.6], [0.1, 0.2, 0.3]
    out = della(
        base, xs, w, d, e, torch.Generator().manual_seed(12), consensus="none", rescale="none",
        normalize=False,
    )  # fmt: skip
    g = torch.Generator().manual_seed(12)
    ref = base.double()
    for wk, dk, ek, x in zip(w, d, e, xs, strict=True):
        tau = x - base
        keep = torch.rand(tau.shape, generator=g) < della_probabilities(tau, dk, ek)
        ref = ref + wk * (tau * keep).double()
    torch.testing.assert_close(out.double(), ref)


def test_della_determinism_and_dtypes() -> None:
    base, xs = _setup(13)
    args = ([1.0] * 3, [0.5] * 3, [0.2] * 3)
    a = della(base, xs, *args, torch.Generator().manual_seed(1))
    b = della(base, xs, *args, torch.Generator().manual_seed(1))
    c = della(base, xs, *args, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for dtype in (torch.bfloat16, torch.float16):
        out = della(base, xs, *args, torch.Generator().manual_seed(1), dtype=dtype)
        assert out.dtype == dtype
    # float16 on the CPU draws and rescales in float32 (as mergekit); bfloat16 stays
    tau = torch.randn(4, 300, generator=torch.Generator().manual_seed(3))
    assert della_probabilities(tau.half(), 0.5, 0.1).dtype == torch.float32
    bf = della_probabilities(tau.bfloat16(), 0.5, 0.1)
    assert bf.dtype == torch.bfloat16
    # ranks above 256 round to 8 bits (≤ 2 ranks of 299 here: 0.0014 in p), p itself
    # rounds by ≤ 2⁻⁹ · 0.6, and bfloat16 magnitudes tie where float32 ones do not
    exact = della_probabilities(tau, 0.5, 0.1)
    torch.testing.assert_close(bf.float(), exact, atol=0.01, rtol=0)
