"""Bad inputs end in CheckpointError naming the file and tensor."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from shoal.checkpoint import open_checkpoint
from shoal.errors import CheckpointError


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def test_missing_path_and_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"d: no weights found"):
        open_checkpoint(tmp_path / "d")


def test_truncated_file_names_file_and_tensor(tmp_path: Path) -> None:
    f = _write(tmp_path / "m.safetensors", {"a": torch.ones(10), "big": torch.ones(100)})
    raw = f.read_bytes()
    f.write_bytes(raw[:-50])
    with pytest.raises(CheckpointError, match=r"m\.safetensors: truncated: tensor 'big'"):
        open_checkpoint(f)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x01\x02",
        struct.pack("<Q", 10**12) + b"{}",
        struct.pack("<Q", 4) + b"{{{{",
        struct.pack("<Q", 2) + b"[]",
    ],
)
def test_corrupt_header(tmp_path: Path, payload: bytes) -> None:
    f = tmp_path / "bad.safetensors"
    f.write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors"):
        open_checkpoint(f)


def test_inconsistent_offsets(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"x\.safetensors: tensor 'w'"):
        open_checkpoint(f)


def test_index_with_missing_shard_or_tensor(tmp_path: Path) -> None:
    d = tmp_path / "m"
    _write(d / "s1.safetensors", {"a": torch.ones(2)})
    index = {"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"s1\.safetensors: tensor 'b' is listed"):
        open_checkpoint(d)
    index["weight_map"]["b"] = "s2.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"shard 's2\.safetensors' listed for tensor 'b'"):
        open_checkpoint(d)
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index"):
        open_checkpoint(d)


def test_unknown_tensor_names_tensor_and_checkpoint(tmp_path: Path) -> None:
    f = _write(tmp_path / "m.safetensors", {"a": torch.ones(2)})
    with open_checkpoint(f) as r:
        for call in (r.get, r.shape, r.dtype, r.numel):
            with pytest.raises(CheckpointError, match=r"m\.safetensors: no tensor named 'zz'"):
                call("zz")
        assert "a" in r and "zz" not in r and len(r) == 1


def test_several_weight_files_without_index(tmp_path: Path) -> None:
    _write(tmp_path / "a.safetensors", {"a": torch.ones(1)})
    _write(tmp_path / "b.safetensors", {"b": torch.ones(1)})
    with pytest.raises(CheckpointError, match="several weight files"):
        open_checkpoint(tmp_path)


def test_bad_config_json(tmp_path: Path) -> None:
    _write(tmp_path / "model.safetensors", {"a": torch.ones(1)})
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"config\.json"):
        open_checkpoint(tmp_path)
