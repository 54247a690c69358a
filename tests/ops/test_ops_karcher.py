"""Karcher mean: by hand on the circle, its fixed points, and its invariances."""

from __future__ import annotations

import math

import pytest
import torch

from shoal.errors import MergeError
from shoal.ops import OPERATORS, karcher


def test_two_directions_on_the_circle_by_hand() -> None:
    """The Karcher mean of two unit directions is their midpoint on the great circle;
    the norm is the mean norm: (2, 0) and (0, 4) give 3 · (1, 1)/√2."""
    out = karcher([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])])
    torch.testing.assert_close(out, torch.tensor([3.0, 3.0]) / math.sqrt(2))


def test_weighted_mean_on_the_circle_by_hand() -> None:
    """Directions at angles 0 and 90°, weights 3:1: the weighted Fréchet mean on a circle
    lies at the weighted mean angle, 22.5°; the norm is 3/4 · 1 + 1/4 · 1."""
    out = karcher([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [3.0, 1.0], max_iter=50)
    angle = math.radians(22.5)
    torch.testing.assert_close(out, torch.tensor([math.cos(angle), math.sin(angle)]))


def test_identical_tensors_give_that_tensor() -> None:
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(karcher([x, x, x]), x)
    assert karcher([x]) is not None and torch.equal(karcher([x]), x)


def test_the_mean_of_three_directions_is_stationary() -> None:
    """At the Karcher mean μ the weighted sum of the log maps Σ θ_k/sin θ_k (u_k − cos θ_k μ)
    vanishes (the defining property), and the norm is the mean of the norms."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(6, 4, generator=g) for _ in range(3)]
    out = karcher(xs, max_iter=100, tol=1e-7)
    mu = (out / out.norm()).double().reshape(-1)
    grad = torch.zeros_like(mu)
    for x in xs:
        u = (x / x.norm()).double().reshape(-1)
        cos = torch.clamp(mu @ u, -1, 1)
        theta = torch.arccos(cos)
        grad += theta / torch.sin(theta) * (u - cos * mu)
    assert float(grad.norm()) < 1e-4
    torch.testing.assert_close(out.norm(), torch.stack([x.norm() for x in xs]).mean())


def test_scaling_and_rotation() -> None:
    """Scaling every input scales the mean; a rotation of all inputs rotates it."""
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(3, generator=g) for _ in range(4)]
    out = karcher(xs, max_iter=50, tol=1e-7)
    torch.testing.assert_close(karcher([2.5 * x for x in xs], max_iter=50, tol=1e-7), 2.5 * out)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    rotated = karcher([q @ x for x in xs], max_iter=50, tol=1e-7)
    torch.testing.assert_close(rotated, q @ out, atol=1e-5, rtol=1e-5)


def test_zero_inputs() -> None:
    """A zero tensor has no direction and is left out of it, but its norm 0 still counts
    in the mean norm; all zero gives zeros."""
    x = torch.tensor([0.0, 3.0])
    torch.testing.assert_close(karcher([x, torch.zeros(2)]), torch.tensor([0.0, 1.5]))
    assert not karcher([torch.zeros(2, 2), torch.zeros(2, 2)]).any()


def test_dtype_and_errors() -> None:
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(8, 8, generator=g) for _ in range(2)]
    out = karcher(xs, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), karcher(xs), atol=0.02, rtol=0.02)
    with pytest.raises(MergeError, match="shape mismatch"):
        karcher([xs[0], xs[1][:2]])
    with pytest.raises(MergeError, match="no models"):
        karcher([])
    with pytest.raises(MergeError, match="sum to zero"):
        karcher(xs, [1.0, -1.0])
    assert OPERATORS["karcher"] is karcher
