"""Multi-SLERP: by hand, against its closed form, and at its degenerate cases."""

from __future__ import annotations

import math

import pytest
import torch

from shoal.errors import MergeError
from shoal.ops import OPERATORS, multislerp


def test_two_orthogonal_models_by_hand() -> None:
    """x_1 = 2e_1, x_2 = 4e_2, weights 3:1 (normalised to 0.75, 0.25): the mean direction
    is (0.75, 0.25)/|·| = (3, 1)/√10, where the tangent mean vanishes, and the norm is
    0.75·2 + 0.25·4 = 2.5."""
    out = multislerp([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])], [3.0, 1.0])
    torch.testing.assert_close(out, 2.5 * torch.tensor([3.0, 1.0]) / math.sqrt(10))


def test_closed_form() -> None:
    """The tangent step cancels (Σ w_k (u_k − (u_k·m) m) = 0 when m is the direction of
    Σ w_k u_k), so θ = (Σ w_k ‖x_k‖) · Σ w_k u_k / ‖Σ w_k u_k‖, u_k = x_k/‖x_k‖."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 5, generator=g) for _ in range(4)]
    w = [0.5, 1.0, 0.2, 0.3]
    wn = [v / sum(w) for v in w]
    units = sum(wk * x / x.norm() for wk, x in zip(wn, xs, strict=True))
    expected = sum(wk * x.norm() for wk, x in zip(wn, xs, strict=True)) * units / units.norm()
    torch.testing.assert_close(multislerp(xs, w), expected)
    # without normalising, the direction is the same and the norm scales with Σ w
    scaled = multislerp(xs, [2 * v for v in w], normalize_weights=False)
    torch.testing.assert_close(scaled, 2 * sum(w) * expected)


def test_identical_models_give_that_model() -> None:
    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(multislerp([x, x, x], [0.2, 0.5, 0.3]), x)
    assert torch.equal(multislerp([x], [0.7]), x)


def test_a_base_is_the_origin() -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(5, 5, generator=g)
    xs = [base + torch.randn(5, 5, generator=g) for _ in range(3)]
    w = [1.0, 2.0, 1.0]
    out = multislerp(xs, w, base)
    torch.testing.assert_close(out, base + multislerp([x - base for x in xs], w), atol=1e-6, rtol=0)
    torch.testing.assert_close(multislerp([xs[0], xs[0]], [1, 1], base), xs[0])


def test_cancelling_directions() -> None:
    """x and −x with equal weights: two models fall back to w_1 x_1 + w_2 x_2; more that
    cancel are an error naming the weights."""
    x = torch.tensor([1.0, -2.0, 0.5])
    base = torch.tensor([0.1, 0.2, 0.3])
    assert not multislerp([x, -x], [1.0, 1.0]).any()
    torch.testing.assert_close(multislerp([base + x, base - x], [1.0, 1.0], base), base)
    y = torch.tensor([2.0, -4.0, 1.0])
    with pytest.raises(MergeError, match="cancel out"):
        multislerp([x, -x, y, -y], [1.0, 1.0, 1.0, 1.0])
    with pytest.raises(MergeError, match="sum to zero"):
        multislerp([x, y], [1.0, -1.0])


def test_dtype_and_shapes() -> None:
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(8, 8, generator=g) for _ in range(3)]
    out = multislerp(xs, [1, 1, 1], dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), multislerp(xs, [1, 1, 1]), atol=0.02, rtol=0.02)
    with pytest.raises(MergeError, match="shape mismatch"):
        multislerp([xs[0], xs[1][:3]], [1, 1])
    with pytest.raises(MergeError, match="weights given"):
        multislerp(xs, [1, 1])
    assert OPERATORS["multislerp"] is multislerp
