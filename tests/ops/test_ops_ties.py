"""TIES against a hand example and a per-entry loop implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal.ops import task_arithmetic, ties


def _ties_loop(base, xs, w, dens, normalize=True, majority="sum"):
    """Scalar-loop TIES written straight from the paper's three steps."""
    base = base.reshape(-1).tolist()
    deltas = []
    for x, d in zip(xs, dens, strict=True):
        tau = [xi - bi for xi, bi in zip(x.reshape(-1).tolist(), base, strict=True)]
        k = int(d * len(tau)) if d < 1 else len(tau)
        keep = sorted(range(len(tau)), key=lambda i: (-abs(tau[i]), i))[:k]
        deltas.append([tau[i] if i in keep else 0.0 for i in range(len(tau))])
    out = []
    for j in range(len(base)):
        vals = [wk * dk[j] for wk, dk in zip(w, deltas, strict=True)]
        if majority == "sum":
            s = 1.0 if sum(vals) >= 0 else -1.0
        else:
            s = 1.0 if sum(np.sign(vals)) >= 0 else -1.0
        agree = [i for i, v in enumerate(vals) if v != 0 and np.sign(v) == s]
        total = sum(vals[i] for i in agree)
        div = sum(w[i] for i in agree)
        if normalize and abs(div) >= 1e-8:
            total /= div
        out.append(base[j] + total)
    return np.array(out, dtype=np.float64)


def test_ties_hand_example() -> None:
    base = torch.zeros(3)
    t1 = torch.tensor([3.0, -1.0, 0.5])
    t2 = torch.tensor([-1.0, -2.0, 1.0])
    # signs of the sums [2, -3, 1.5] = [+, -, +]; agreeing means: [3/1, -3/2, 1.5/2]
    out = ties(base, [t1, t2], [1.0, 1.0], [1.0, 1.0])
    torch.testing.assert_close(out, torch.tensor([3.0, -1.5, 0.75]))
    # unnormalised: agreeing sums
    out = ties(base, [t1, t2], [1.0, 1.0], [1.0, 1.0], normalize=False)
    torch.testing.assert_close(out, torch.tensor([3.0, -3.0, 1.5]))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("majority", ["sum", "count"])
def test_ties_matches_loop(normalize: bool, majority: str) -> None:
    g = torch.Generator().manual_seed(11)
    base = torch.randn(4, 5, generator=g)
    xs = [base + torch.randn(4, 5, generator=g) for _ in range(3)]
    w, dens = [0.5, 1.0, 0.8], [0.3, 0.6, 1.0]
    out = ties(base, xs, w, dens, normalize=normalize, majority=majority)  # type: ignore[arg-type]
    ref = _ties_loop(base, xs, w, dens, normalize, majority)
    np.testing.assert_allclose(out.reshape(-1).numpy(), ref, rtol=1e-5, atol=1e-5)


def test_ties_one_model_full_density_is_task_arithmetic() -> None:
    g = torch.Generator().manual_seed(12)
    base, x = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    torch.testing.assert_close(
        ties(base, [x], [0.7], [1.0], normalize=False), task_arithmetic(base, [x], [0.7])
    )
    torch.testing.assert_close(ties(base, [x], [0.7], [1.0]), x)


def test_ties_model_with_itself() -> None:
    g = torch.Generator().manual_seed(13)
    base, x = torch.randn(10, generator=g), torch.randn(10, generator=g)
    torch.testing.assert_close(ties(base, [x, x], [1.0, 1.0], [1.0, 1.0]), x)


@pytest.mark.parametrize("consensus", ["ties", "none"])
@pytest.mark.parametrize("normalize", [True, False])
def test_combine_in_chunks_equals_combine_at_once(consensus: str, normalize: bool) -> None:
    from shoal.ops.consensus import combine

    gen = torch.Generator().manual_seed(11)
    deltas = torch.randn(3, 37, 29, generator=gen)
    deltas[deltas.abs() < 0.5] = 0.0  # sparse, with entries where no model agrees
    w = [0.7, -0.2, 1.1]
    whole = combine(deltas, w, consensus=consensus, normalize=normalize, chunk=10**9)
    chunked = combine(deltas, w, consensus=consensus, normalize=normalize, chunk=100)
    assert chunked.shape == whole.shape
    assert torch.equal(chunked, whole)


@pytest.mark.parametrize("majority", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_combine_equals_masking_by_sign_agreement(majority: str, normalize: bool) -> None:
    """The positive/negative-part sums give the same bits as the textbook agreement mask."""
    from shoal.ops.consensus import combine, elect_sign

    gen = torch.Generator().manual_seed(5)
    deltas = torch.randn(4, 61, 17, generator=gen)
    deltas[deltas.abs() < 0.4] = 0.0
    w = torch.tensor([0.9, 0.35, -0.6, 1.2]).reshape(-1, 1, 1)
    weighted = w * deltas
    agree = weighted.sign() == elect_sign(weighted, majority)  # zeros agree with nothing
    expected = (weighted * agree).sum(0)
    if normalize:
        divisor = (w * agree).sum(0)
        expected = expected / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    got = combine(
        deltas, w.flatten().tolist(), consensus="ties", normalize=normalize, majority=majority
    )
    assert torch.equal(got, expected)
