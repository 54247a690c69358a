"""Writing and reading back: single file, shards, both writer modes, transformers."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shoal.checkpoint import ShardedWriter, open_checkpoint, read_header

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "emb.weight": torch.randn(10, 10, generator=g),  # 400 bytes
        "layers.0.w": torch.randn(10, 10, generator=g).to(torch.bfloat16),  # 200
        "layers.0.b": torch.arange(25, dtype=torch.int64),  # 200
        "layers.1.w": torch.randn(100, generator=g).half(),  # 200
        "mask": torch.tensor([True, False, True]),  # 3
        "empty": torch.zeros(0, 4),  # 0
        "scalar": torch.tensor(3.5),  # 4
    }


def _plan(ts: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in ts.items()}


@pytest.mark.parametrize("planned", [True, False])
def test_single_file_round_trip(tmp_path: Path, planned: bool) -> None:
    ts = _tensors()
    out = tmp_path / "out"
    with ShardedWriter(out, plan=_plan(ts) if planned else None) as w:
        # planned: add in reverse order — bytes still land at their planned offsets
        for name in reversed(ts) if planned else ts:
            w.add(name, ts[name])
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dir left
    loaded = load_file(str(out / "model.safetensors"))  # the reference reader agrees
    assert loaded.keys() == ts.keys()
    for k, v in ts.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    with open_checkpoint(out) as r:
        assert r.keys() == list(ts)
        assert r.nbytes() == sum(v.numel() * v.element_size() for v in ts.values())
        for k, v in ts.items():
            assert r.shape(k) == tuple(v.shape) and r.dtype(k) == v.dtype
            assert torch.equal(r.get(k), v)
        assert r.get("layers.0.w", dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("planned", [True, False])
def test_sharded_round_trip(tmp_path: Path, planned: bool) -> None:
    ts = _tensors()
    out = tmp_path / "out"
    with ShardedWriter(out, plan=_plan(ts) if planned else None, max_shard_bytes=450) as w:
        for name, t in ts.items():
            w.add(name, t)
    # 400 | 200+200 | 200+3+0+4 -> three shards
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 1007
    assert list(index["weight_map"]) == list(ts)
    assert index["weight_map"]["emb.weight"] == "model-00001-of-00003.safetensors"
    assert index["weight_map"]["layers.0.b"] == "model-00002-of-00003.safetensors"
    assert index["weight_map"]["scalar"] == "model-00003-of-00003.safetensors"
    for name, shard in index["weight_map"].items():
        with safe_open(str(out / shard), framework="pt") as f:
            assert torch.equal(f.get_tensor(name), ts[name])
    with open_checkpoint(out) as r:
        assert r.keys() == list(ts)
        for k, v in ts.items():
            assert torch.equal(r.get(k), v)


def test_header_is_aligned_and_declares_pt_format(tmp_path: Path) -> None:
    out = tmp_path / "o"
    with ShardedWriter(out) as w:
        w.add("x", torch.ones(3))
    raw = (out / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    assert json.loads(raw[8 : 8 + n])["__metadata__"] == {"format": "pt"}


def test_one_oversized_tensor_gets_its_own_shard(tmp_path: Path) -> None:
    out = tmp_path / "o"
    with ShardedWriter(out, max_shard_bytes=10) as w:
        w.add("a", torch.ones(100))
        w.add("b", torch.ones(1))
    assert len(list(out.glob("*.safetensors"))) == 2


def test_reads_files_written_by_safetensors_and_transformers(tmp_path: Path) -> None:
    ts = {"b": torch.ones(2, 3), "a": torch.zeros(4, dtype=torch.int32)}
    save_file(ts, str(tmp_path / "w.safetensors"))
    with open_checkpoint(tmp_path / "w.safetensors") as r:
        infos, _ = read_header(tmp_path / "w.safetensors")
        assert set(r.keys()) == {"a", "b"} and r.keys() == list(infos)
        assert r.config is None
        assert torch.equal(r.get("b"), ts["b"]) and torch.equal(r.get("a"), ts["a"])


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(0)  # fixed weights, independent of the global RNG
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_transformers_loads_a_sharded_llama_written_by_the_writer(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = _tiny_llama()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = tmp_path / "llama"
    plan = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}
    with ShardedWriter(out, plan=plan, max_shard_bytes=8000) as w:
        w.write_text("config.json", model.config.to_json_string())
        for k, v in sd.items():
            w.add(k, v)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_reads_transformers_save_pretrained_sharded(tmp_path: Path) -> None:
    model = _tiny_llama()
    model.save_pretrained(tmp_path / "m", max_shard_size="20KB")
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    sd = model.state_dict()
    with open_checkpoint(tmp_path / "m") as r:
        assert r.config is not None and r.config["num_hidden_layers"] == 3
        assert set(r.keys()) == set(sd)
        for k in r:
            assert torch.equal(r.get(k), sd[k]), k
