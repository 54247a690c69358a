"""linear and task_arithmetic against hand-computed values and numpy formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal.errors import MergeError
from shoal.ops import linear, task_arithmetic


def test_linear_hand_computed() -> None:
    a = torch.tensor([1.0, 2.0])
    b = torch.tensor([3.0, 6.0])
    # (1*1 + 3*3) / 4 = 2.5 ; (1*2 + 3*6) / 4 = 5
    assert torch.equal(linear([a, b], [1.0, 3.0]), torch.tensor([2.5, 5.0]))
    assert torch.equal(linear([a, b], [1.0, 3.0], normalize=False), torch.tensor([10.0, 20.0]))


def test_linear_matches_numpy_and_returns_fp32() -> None:
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 4, generator=g).to(torch.bfloat16) for _ in range(3)]
    w = [0.2, 0.5, 1.3]
    out = linear(xs, w)
    ref = sum(wk * x.float().numpy() for wk, x in zip(w, xs, strict=True)) / sum(w)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-6)


def test_linear_of_one_model_with_itself_is_that_model() -> None:
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(linear([x, x, x], [0.3, 0.3, 0.4]), x)


def test_linear_errors() -> None:
    x = torch.ones(2)
    with pytest.raises(MergeError, match="sum to zero"):
        linear([x, x], [1.0, -1.0])
    with pytest.raises(MergeError, match="shape mismatch"):
        linear([x, torch.ones(3)], [1.0, 1.0])
    with pytest.raises(MergeError, match="2 weights given for 3 models"):
        linear([x, x, x], [1.0, 1.0])


def test_task_arithmetic_formula() -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 3, generator=g)
    xs = [torch.randn(4, 3, generator=g) for _ in range(2)]
    w, lam = [0.7, -0.4], 0.5
    ref = base.numpy() + lam * sum(
        wk * (x.numpy() - base.numpy()) for wk, x in zip(w, xs, strict=True)
    )
    np.testing.assert_allclose(task_arithmetic(base, xs, w, lam=lam).numpy(), ref, atol=1e-6)
    ref_norm = base.numpy() + sum(
        wk * (x.numpy() - base.numpy()) for wk, x in zip(w, xs, strict=True)
    ) / sum(w)
    np.testing.assert_allclose(
        task_arithmetic(base, xs, w, normalize=True).numpy(), ref_norm, rtol=1e-5, atol=1e-5
    )


def test_task_arithmetic_with_base_equal_to_model_is_the_model() -> None:
    x = torch.randn(6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(task_arithmetic(x, [x, x], [0.8, 1.7]), x)


def test_task_arithmetic_base_shape_checked() -> None:
    with pytest.raises(MergeError, match="base"):
        task_arithmetic(torch.ones(3), [torch.ones(2)], [1.0])
