"""NuSLERP: by hand over whole tensors, rows and columns; its t; its base; against SLERP."""

from __future__ import annotations

import math

import pytest
import torch

from shoal.errors import MergeError
from shoal.ops import OPERATORS, nuslerp, nuslerp_merge, nuslerp_t, slerp

R = math.sqrt(0.5)


def test_whole_tensor_by_hand() -> None:
    # Ω = 90°, t = 1/3: sin(60°)·a + sin(30°)·b
    out = nuslerp(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 3.0]), 1 / 3)
    torch.testing.assert_close(out, torch.tensor([math.sqrt(3), 1.5]))
    # as one flat vector: a = (1, 0, 1, 0), b = (0, 1, 1, 0), cos Ω = 1/2, Ω = 60°, t = ½:
    # (sin 30°/sin 60°)(a + b) = (a + b)/√3
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(nuslerp(a, b, 0.5), (a + b) / math.sqrt(3))


def test_rows_and_columns_by_hand() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # rows: the first pair is orthogonal (R, R), the second colinear (linear: (1, 0))
    rows = nuslerp(a, b, 0.5, flatten=False)
    torch.testing.assert_close(rows, torch.tensor([[R, R], [1.0, 0.0]]))
    # columns (row_wise): a's columns (1, 1), (0, 0) against b's (0, 1), (1, 0)
    a = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    cols = nuslerp(a, b, 0.5, flatten=False, row_wise=True)
    # column 0: (1, 0) → (0, 1) orthogonal: (R, R); column 1: (1, 0) → (1, 0) colinear
    torch.testing.assert_close(cols, torch.tensor([[R, 1.0], [R, 0.0]]))
    # flatten wins over row_wise
    torch.testing.assert_close(nuslerp(a, b, 0.3, row_wise=True), nuslerp(a, b, 0.3))


def test_endpoints_and_slerp() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    torch.testing.assert_close(nuslerp(a, b, 0.0), a)
    torch.testing.assert_close(nuslerp(a, b, 1.0), b)
    for t in (0.2, 0.7):  # over the whole tensor it is SLERP
        torch.testing.assert_close(nuslerp(a, b, t), slerp(a, b, t))
        for i in range(5):  # row by row, SLERP of each row
            torch.testing.assert_close(nuslerp(a, b, t, flatten=False)[i], slerp(a[i], b[i], t))


def test_t_from_the_weights() -> None:
    assert nuslerp_t([1.0, 3.0]) == 0.75
    assert nuslerp_t([2.0, 0.0]) == 0.0
    assert nuslerp_t([1.0, -1.0]) == 0.5  # no direction to the weights: halfway
    with pytest.raises(MergeError, match="weights given"):
        nuslerp_t([1.0])


def test_merge_with_and_without_a_base() -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 3, generator=g)
    a, b = base + torch.randn(4, 3, generator=g), base + torch.randn(4, 3, generator=g)
    out = nuslerp_merge([a, b], [1.0, 3.0], base, flatten=False)
    torch.testing.assert_close(out, base + nuslerp(a - base, b - base, 0.75, flatten=False))
    torch.testing.assert_close(nuslerp_merge([a, b], [1.0, 1.0]), nuslerp(a, b, 0.5))
    with pytest.raises(MergeError, match="exactly 2"):
        nuslerp_merge([a, b, base], [1.0, 1.0, 1.0])
    assert OPERATORS["nuslerp"] is nuslerp_merge


def test_dtype_and_shapes() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    out = nuslerp(a, b, 0.4, flatten=False, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), nuslerp(a, b, 0.4, flatten=False), atol=0.03, rtol=0.03)
    with pytest.raises(MergeError, match="shape mismatch"):
        nuslerp(a, b[:2], 0.5)
