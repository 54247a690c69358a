"""SVD cache: the fingerprint follows the bytes, the cache is written once and reused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shoal.adapt.svd_cache import compute_svd, matrix_fingerprint, svd_factors
from shoal.adapt.svf import wrap_svf


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.mlp.up": torch.randn(6, 4, generator=g),
        "a.mlp.down": torch.randn(4, 6, generator=g),
    }


def _no_svd(*args: object, **kwargs: object) -> object:
    raise AssertionError("torch.linalg.svd called although the cache holds the SVD")


def test_fingerprint_follows_names_dtypes_shapes_and_bytes() -> None:
    w = _weights()
    fp = matrix_fingerprint(w)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert matrix_fingerprint({k: v.clone() for k, v in reversed(w.items())}) == fp
    bumped = {k: v.clone() for k, v in w.items()}
    bumped["a.mlp.up"][2, 3] = torch.nextafter(bumped["a.mlp.up"][2, 3], torch.tensor(9.0))
    assert matrix_fingerprint(bumped) != fp  # one ulp in one number
    assert matrix_fingerprint({"b" + k: v for k, v in w.items()}) != fp
    assert matrix_fingerprint({k: v.double() for k, v in w.items()}) != fp
    assert matrix_fingerprint({k: v.reshape(v.shape[1], v.shape[0]) for k, v in w.items()}) != fp
    bf16 = {k: v.bfloat16() for k, v in w.items()}  # a dtype numpy lacks
    assert matrix_fingerprint(bf16) == matrix_fingerprint({k: v.clone() for k, v in bf16.items()})


def test_factors_are_fp32_thin_svd() -> None:
    w = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f = compute_svd(w.to(torch.bfloat16))
    assert f.U.shape == (7, 3) and f.S.shape == (3,) and f.Vh.shape == (3, 3)
    assert {f.U.dtype, f.S.dtype, f.Vh.dtype} == {torch.float32}
    assert bool((f.S[:-1] >= f.S[1:]).all())
    torch.testing.assert_close(
        (f.U * f.S) @ f.Vh, w.to(torch.bfloat16).float(), atol=1e-5, rtol=1e-5
    )


def test_cache_written_once_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = _weights()
    first, info1 = svd_factors(w, tmp_path)
    assert not info1.reused and info1.path is not None and info1.path.is_file()
    # 4 bytes per fp32 number: U (m×r) + S (r) + Vh (r×n), r = 4 for both matrices
    assert info1.nbytes == 4 * 2 * (6 * 4 + 4 + 4 * 4)
    assert info1.nbytes < info1.path.stat().st_size < info1.nbytes + 4096
    assert [p.name for p in tmp_path.iterdir()] == [info1.path.name]  # no temp file left
    monkeypatch.setattr(torch.linalg, "svd", _no_svd)
    second, info2 = svd_factors({k: v.clone() for k, v in w.items()}, tmp_path)
    assert info2.reused and info2.path == info1.path and info2.fingerprint == info1.fingerprint
    for name in w:
        for part in ("U", "S", "Vh"):
            assert torch.equal(getattr(second[name], part), getattr(first[name], part))
    # other weights: a different key, so the patched SVD is reached
    with pytest.raises(AssertionError, match="cache holds"):
        svd_factors(_weights(seed=1), tmp_path)


def test_damaged_cache_is_computed_again(tmp_path: Path) -> None:
    w = _weights()
    _, info = svd_factors(w, tmp_path)
    assert info.path is not None
    good = info.path.read_bytes()
    info.path.write_bytes(good[: len(good) // 2])  # truncated
    factors, again = svd_factors(w, tmp_path)
    assert not again.reused and again.path == info.path
    assert info.path.stat().st_size == len(good)  # rewritten whole
    assert svd_factors(w, tmp_path)[1].reused
    torch.testing.assert_close(
        (factors["a.mlp.up"].U * factors["a.mlp.up"].S) @ factors["a.mlp.up"].Vh, w["a.mlp.up"]
    )


def test_wrap_reuses_cache(
    tmp_path: Path, make_llama: object, monkeypatch: pytest.MonkeyPatch, input_ids: torch.Tensor
) -> None:
    first = wrap_svf(make_llama(0), cache_dir=tmp_path)  # type: ignore[operator]
    assert not first.cache.reused
    monkeypatch.setattr(torch.linalg, "svd", _no_svd)
    model = make_llama(0)  # type: ignore[operator]
    with torch.no_grad():
        ref = model(input_ids=input_ids).logits
    second = wrap_svf(model, cache_dir=tmp_path)
    assert second.cache.reused and second.fingerprint == first.fingerprint
    with torch.no_grad():
        assert torch.equal(second(input_ids=input_ids).logits, ref)
    with pytest.raises(AssertionError, match="cache holds"):
        wrap_svf(make_llama(1), cache_dir=tmp_path)  # type: ignore[operator]
