"""Split-point crossover and SVD mutation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal.errors import MergeError
from shoal.ops import OPERATORS, cosine, slerp, splitpoint, splitpoint_flat, svd_mutation_for
from shoal.ops.svd_mutation import svd_mutation


def _pair(seed: int, shape=(4, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def test_split_at_the_ends() -> None:
    a, b = _pair(0)
    # split <= 0: all entries are "after" -> t = 1 - ratio
    torch.testing.assert_close(splitpoint(a, b, split=0, ratio=0.3), slerp(a, b, 0.7))
    torch.testing.assert_close(splitpoint(a, b, split=-5, ratio=0.3), slerp(a, b, 0.7))
    # split >= numel: all entries are "before" -> t = ratio
    torch.testing.assert_close(splitpoint(a, b, split=24, ratio=0.3), slerp(a, b, 0.3))
    torch.testing.assert_close(splitpoint(a, b, split=99, ratio=0.3), slerp(a, b, 0.3))


def test_split_in_the_middle_uses_both_ts() -> None:
    a, b = _pair(1)
    c = cosine(a, b)
    out = splitpoint(a, b, split=10, ratio=0.2).reshape(-1)
    fa, fb = a.reshape(-1), b.reshape(-1)
    torch.testing.assert_close(out[:10], slerp(fa[:10], fb[:10], 0.2, cos=c))
    torch.testing.assert_close(out[10:], slerp(fa[10:], fb[10:], 0.8, cos=c))


def test_per_tensor_pieces_reproduce_the_flat_global_crossover() -> None:
    a, b = _pair(2, (50,))
    split, ratio = 17, 0.35
    whole = splitpoint_flat(a, b, split, ratio, angle="global")
    c = cosine(a, b)
    pieces = []
    for lo, hi in ((0, 12), (12, 30), (30, 50)):  # three "tensors" of the model
        pieces.append(
            splitpoint(a[lo:hi], b[lo:hi], split=split - lo, ratio=ratio, cos_before=c, cos_after=c)
        )
    torch.testing.assert_close(torch.cat(pieces), whole)


def test_segment_angle() -> None:
    a, b = _pair(3, (40,))
    seg = splitpoint_flat(a, b, 15, 0.4, angle="segment")
    torch.testing.assert_close(seg[:15], slerp(a[:15], b[:15], 0.4))
    torch.testing.assert_close(seg[15:], slerp(a[15:], b[15:], 0.6))
    assert not torch.allclose(seg, splitpoint_flat(a, b, 15, 0.4, angle="global"))


@pytest.mark.parametrize("angle", ["global", "segment"])
def test_out_receives_the_same_child(angle) -> None:
    """``out=`` (a flat model's parameters) gets the tensor a new output would hold."""
    a, b = _pair(5, (30,))
    out = torch.full((30,), float("nan"))
    got = splitpoint_flat(a, b, 11, 0.3, angle=angle, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, splitpoint_flat(a, b, 11, 0.3, angle=angle), rtol=0, atol=0)
    shaped = torch.empty(4, 6)
    splitpoint(*_pair(6), split=9, ratio=0.7, out=shaped)
    torch.testing.assert_close(shaped, splitpoint(*_pair(6), split=9, ratio=0.7), rtol=0, atol=0)


def test_cosine_is_the_float64_angle() -> None:
    a, b = _pair(7, (33,))
    a64, b64 = a.double().numpy(), b.double().numpy()
    want = float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))
    assert cosine(a, b) == pytest.approx(want, rel=1e-12)
    assert cosine(torch.zeros(3), torch.ones(3)) == 0.0
    # bit for bit the Tensor.norm() form the published runs' angles were computed with
    for seed, shape in ((7, (33,)), (8, (19_210,)), (9, (64, 256))):
        x, y = (t.reshape(-1).double() for t in _pair(seed, shape))
        assert cosine(x, y) == float(x @ y) / (float(x.norm()) * float(y.norm()))


def test_splitpoint_out_must_hold_the_whole_float32_result() -> None:
    a, b = _pair(2)
    out = torch.empty(a.numel())
    got = splitpoint(a, b, split=5, ratio=0.3, out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, splitpoint(a, b, split=5, ratio=0.3), rtol=0, atol=0)
    for wrong in (torch.empty(3), torch.empty(a.numel(), dtype=torch.float64)):
        with pytest.raises(MergeError, match="out="):
            splitpoint(a, b, split=5, ratio=0.3, out=wrong)


def test_svd_mutation_zero_is_identity() -> None:
    theta, tv = _pair(4)
    out = svd_mutation_for(theta, tv, torch.Generator().manual_seed(0), w_max=0.0)
    torch.testing.assert_close(out, theta)


def test_svd_mutation_adds_a_matrix_in_the_span_of_u_and_v() -> None:
    theta = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
    # a rank-2 task vector: the update must live in its column and row spaces
    g = torch.Generator().manual_seed(6)
    tv = torch.randn(8, 2, generator=g) @ torch.randn(2, 6, generator=g)
    delta = (svd_mutation_for(theta, tv, torch.Generator().manual_seed(1), 0.1) - theta).double()
    assert float(delta.norm()) > 1e-4
    q_col, _ = torch.linalg.qr(tv.double())
    q_row, _ = torch.linalg.qr(tv.double().T)
    proj_col = q_col[:, :2] @ q_col[:, :2].T
    proj_row = q_row[:, :2] @ q_row[:, :2].T
    torch.testing.assert_close(proj_col @ delta, delta, atol=1e-5, rtol=0)
    torch.testing.assert_close(delta @ proj_row, delta, atol=1e-5, rtol=0)


def test_svd_mutation_formula_with_the_same_draws() -> None:
    theta, tv = _pair(7, (5, 3))
    u, s, vh = torch.linalg.svd(tv, full_matrices=False)
    out = svd_mutation(theta, u, s, vh, torch.Generator().manual_seed(3), w_max=0.1)
    w = torch.rand(3, generator=torch.Generator().manual_seed(3)).numpy() * 0.1
    ref = theta.numpy().astype(np.float64)
    for i in range(3):  # sum of rank-one terms w_i sigma_i u_i v_i^T
        ref = ref + w[i] * float(s[i]) * np.outer(u[:, i].numpy(), vh[i].numpy())
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)


def test_svd_mutation_passes_vectors_through() -> None:
    v = torch.randn(9, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    torch.testing.assert_close(svd_mutation_for(v, v * 2, g), v)
    assert torch.equal(g.get_state(), state)  # nothing drawn


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_registry_entries_are_callable(name: str) -> None:
    assert callable(OPERATORS[name])


def test_splitpoint_recipe_with_scalar_split_is_one_vector() -> None:
    """Per-tensor ratios (a filter list) do not cut the model into chromosomes: only a
    `split` filter list does. Here the split index 4 of the flat 8-vector falls between
    the two tensors, so p lies wholly before it (t = ratio_p) and q wholly after
    (t = 1 - ratio_q), each with its own segment angle."""
    from shoal.merge import merge_state_dicts
    from shoal.ops.splitpoint import splitpoint

    gen = torch.Generator().manual_seed(5)
    a = {"p.weight": torch.randn(4, generator=gen), "q.weight": torch.randn(4, generator=gen)}
    b = {"p.weight": torch.randn(4, generator=gen), "q.weight": torch.randn(4, generator=gen)}
    recipe = {
        "merge_method": "splitpoint",
        "models": [{"model": "a"}, {"model": "b"}],
        "parameters": {
            "split": 0.5,
            "ratio": [{"filter": "p.", "value": 0.2}, {"value": 0.7}],
            "angle": "segment",
        },
    }
    out = merge_state_dicts(recipe, {"a": a, "b": b})
    want_p = splitpoint(a["p.weight"], b["p.weight"], split=4, ratio=0.2)
    want_q = splitpoint(a["q.weight"], b["q.weight"], split=0, ratio=0.7)
    torch.testing.assert_close(out["p.weight"], want_p)
    torch.testing.assert_close(out["q.weight"], want_q)


@pytest.mark.parametrize("angle", ["segment", "global"])
def test_flat_crossover_is_two_slerps_bit_for_bit(angle: str) -> None:
    """splitpoint_flat writes both sides into one output; it must equal the plain
    composition — a SLERP of each side with that side's (or the global) angle — exactly,
    at every split (M2N2's runs are compared digit for digit)."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(1001, generator=g) * 0.05
    b = 0.5 * a + torch.randn(1001, generator=g) * 0.05
    for split in [*range(0, 1002, 37), 1, 1000, -3, 5000]:
        ratio = float(torch.rand((), generator=g))
        s = max(0, min(split, 1001))
        if angle == "global":
            c_before = c_after = cosine(a, b)
        else:
            c_before, c_after = cosine(a[:s], b[:s]), cosine(a[s:], b[s:])
        want = torch.cat(
            [slerp(a[:s], b[:s], ratio, cos=c_before), slerp(a[s:], b[s:], 1 - ratio, cos=c_after)]
        )
        got = splitpoint_flat(a, b, split, ratio, angle)
        assert torch.equal(got, want), split
