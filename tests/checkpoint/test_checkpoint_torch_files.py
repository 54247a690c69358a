"""Pickled state dicts: read only as weights, memory-mapped when possible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shoal.checkpoint import open_checkpoint
from shoal.errors import CheckpointError


def _sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 2, generator=g), "b": torch.arange(4).to(torch.int32)}


@pytest.mark.parametrize("name", ["weights.pt", "pytorch_model.bin", "x.pth"])
def test_pt_file_and_directory(tmp_path: Path, name: str) -> None:
    sd = _sd()
    torch.save(sd, tmp_path / name)
    for target in (tmp_path / name, tmp_path):
        with open_checkpoint(target) as r:
            assert r.keys() == ["w", "b"]
            assert r.shape("w") == (3, 2) and r.dtype("b") == torch.int32
            t = r.get("w")
            assert torch.equal(t, sd["w"])
            t.add_(1.0)  # a fresh tensor: the file's copy is untouched
            assert torch.equal(r.get("w"), sd["w"])


def test_legacy_format_and_nested_state_dict(tmp_path: Path) -> None:
    sd = _sd()
    torch.save(sd, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with open_checkpoint(tmp_path / "old.pt") as r:
        assert torch.equal(r.get("w"), sd["w"])
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "nested.pt")
    with open_checkpoint(tmp_path / "nested.pt") as r:
        assert r.keys() == ["w", "b"]


def test_sharded_bin_index(tmp_path: Path) -> None:
    sd = _sd()
    torch.save({"w": sd["w"]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": sd["b"]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {
        "weight_map": {
            "b": "pytorch_model-00002-of-00002.bin",
            "w": "pytorch_model-00001-of-00002.bin",
        }
    }
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with open_checkpoint(tmp_path) as r:
        assert r.keys() == ["b", "w"]  # index order
        assert torch.equal(r.get("b"), sd["b"]) and torch.equal(r.get("w"), sd["w"])


class _Evil:
    def __reduce__(self):  # would run code if unpickled without weights_only
        return (print, ("pwned",))


def test_untrusted_pickles_are_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1), "x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt"):
        open_checkpoint(tmp_path / "evil.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt: not a state dict"):
        open_checkpoint(tmp_path / "list.pt")
