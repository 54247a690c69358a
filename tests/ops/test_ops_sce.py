"""SCE: select by variance, energy weights, sign erasure — by hand and by property."""

from __future__ import annotations

import pytest
import torch

from shoal.errors import MergeError
from shoal.ops import OPERATORS, sce, sce_mask, sce_weights

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
# task vectors τ_1 = [2, -1, 0, 1], τ_2 = [2, 1, -3, 0]
MODELS = [BASE + torch.tensor([2.0, -1.0, 0.0, 1.0]), BASE + torch.tensor([2.0, 1.0, -3.0, 0.0])]


def test_sce_by_hand_without_selection() -> None:
    # energies: mean τ_1² = 6/4 = 1.5, mean τ_2² = 14/4 = 3.5 → w = [0.3, 0.7]
    # Σ τ = [4, 0, -3, 1] elects [+, + (a zero sum elects +), −, +]
    # agreeing: τ_1 at entries 0 and 3; τ_2 at 0, 1, 2 (its 0 at entry 3 agrees with nothing)
    # entry 0: (0.3·2 + 0.7·2)/1.0 = 2; 1: 0.7·1/0.7 = 1; 2: 0.7·(−3)/0.7 = −3; 3: 0.3·1/0.3 = 1
    out = sce(BASE, MODELS)
    torch.testing.assert_close(out, BASE + torch.tensor([2.0, 1.0, -3.0, 1.0]))
    torch.testing.assert_close(sce_weights(torch.stack(MODELS) - BASE), torch.tensor([0.3, 0.7]))


def test_sce_by_hand_with_selection() -> None:
    # variances over the two models: [0, 1, 2.25, 0.25]: 3 nonzero, int(3 · 0.5) = 1 kept
    deltas = torch.stack(MODELS) - BASE
    mask = sce_mask(deltas, 0.5)
    torch.testing.assert_close(mask, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    # τ̂_1 = 0, τ̂_2 = [0, 0, −3, 0]: weights [0, 1], only entry 2 moves
    out = sce(BASE, MODELS, select_topk=0.5)
    torch.testing.assert_close(out, BASE + torch.tensor([0.0, 0.0, -3.0, 0.0]))
    # 2 of 3 nonzero variances: entries 2 and 1
    torch.testing.assert_close(sce_mask(deltas, 0.7), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert not sce_mask(deltas, 0.0).any() and sce_mask(deltas, 1.0).all()


def test_sce_identical_fine_tunes_give_that_fine_tune() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g)
    tuned = base + torch.randn(5, 7, generator=g)
    torch.testing.assert_close(sce(base, [tuned, tuned, tuned]), tuned)


def test_sce_of_zero_task_vectors_is_the_base() -> None:
    base = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sce(base, [base.clone(), base.clone()], select_topk=0.3), base)
    weights = sce_weights(torch.zeros(2, 3, 4))  # no energy: equal weights
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5]))


def test_sce_result_lies_between_the_agreeing_models() -> None:
    """Each entry is a weighted mean of the agreeing selected task vectors, so it lies
    within their range, with the elected sign; unselected entries keep the base."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(40, 30, generator=g)
    xs = [base + torch.randn(40, 30, generator=g) for _ in range(3)]
    delta = sce(base, xs, select_topk=0.6) - base
    mask = sce_mask(torch.stack(xs) - base, 0.6)
    assert int(mask.sum()) == int(1200 * 0.6)
    assert bool((delta[mask == 0] == 0).all())
    taus = (torch.stack(xs) - base) * mask
    lo, hi = taus.min(0).values, taus.max(0).values
    assert bool(((delta >= lo - 1e-6) & (delta <= hi + 1e-6)).all())
    moved = delta != 0
    assert bool((torch.sign(delta[moved]) == torch.sign(taus.sum(0)[moved])).all())


def test_sce_computes_in_the_given_dtype_and_checks_shapes() -> None:
    out = sce(BASE, MODELS, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), BASE + torch.tensor([2.0, 1.0, -3.0, 1.0]))
    with pytest.raises(MergeError, match="shape mismatch"):
        sce(BASE, [torch.zeros(3)])
    assert OPERATORS["sce"] is sce
