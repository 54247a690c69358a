"""SLERP against rotation geometry, its ends, and its fallbacks."""

from __future__ import annotations

import math

import pytest
import torch

from shoal.ops import slerp


def _unit(angle: float) -> torch.Tensor:
    return torch.tensor([math.cos(angle), math.sin(angle)])


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_slerp_of_unit_vectors_is_rotation(t: float) -> None:
    # on the unit circle, slerp from angle 0 to angle phi at t is the unit vector at t*phi
    phi = 1.2
    out = slerp(_unit(0.0), _unit(phi), t)
    torch.testing.assert_close(out, _unit(t * phi))
    assert abs(float(out.norm()) - 1.0) < 1e-6


def test_slerp_ends_and_norm_in_high_dimension() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    ua, ub = a / a.norm(), b / b.norm()
    for t in (0.1, 0.5, 0.9):
        assert abs(float(slerp(ua, ub, t).norm()) - 1.0) < 1e-5


def test_slerp_with_itself_and_parallel_falls_back_to_linear() -> None:
    a = torch.tensor([1.0, 2.0, -3.0])
    torch.testing.assert_close(slerp(a, a, 0.4), a)
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)


def test_dot_threshold_reproduces_mergekit_lerp() -> None:
    a = _unit(0.0)
    b = 1.5 * _unit(0.02)  # cos = 0.9998 > 0.9995
    lerp = 0.7 * a + 0.3 * b
    torch.testing.assert_close(slerp(a, b, 0.3, dot_threshold=0.9995), lerp)
    assert not torch.allclose(slerp(a, b, 0.3), lerp, atol=1e-7, rtol=0)


def test_given_cos_overrides_the_angle() -> None:
    a, b = _unit(0.0), _unit(0.5)
    omega = 1.0  # pretend the angle were 1 rad
    t = 0.3
    expected = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
    torch.testing.assert_close(slerp(a, b, t, cos=math.cos(omega)), expected)


def test_zero_vector_is_linear() -> None:
    a, b = torch.zeros(3), torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(slerp(a, b, 0.25), 0.25 * b)


def test_zero_vector_in_mergekit_mode_counts_as_orthogonal() -> None:
    a, b = torch.zeros(3), torch.tensor([1.0, 2.0, 3.0])
    t = 0.25
    # mergekit: dot = 0 -> Ω = π/2 -> sin(tπ/2)·b
    torch.testing.assert_close(slerp(a, b, t, dot_threshold=0.9995), math.sin(t * math.pi / 2) * b)
