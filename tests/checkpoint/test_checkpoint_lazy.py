"""Metadata without data reads; one tensor at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shoal.checkpoint import ShardedWriter, open_checkpoint
from shoal.checkpoint import reader as reader_mod


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def test_metadata_does_not_open_tensor_data(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "m"
    with ShardedWriter(out, max_shard_bytes=100) as w:
        for i in range(4):
            w.add(f"t{i}", torch.full((5, 5), float(i)))

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data opened for a metadata query")

    monkeypatch.setattr(reader_mod, "safe_open", refuse)
    r = open_checkpoint(out)
    assert r.keys() == ["t0", "t1", "t2", "t3"]
    assert [r.shape(k) for k in r] == [(5, 5)] * 4
    assert r.dtype("t2") == torch.float32 and r.numel("t3") == 25 and r.nbytes() == 400


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_reading_one_tensor_does_not_load_the_file(tmp_path: Path) -> None:
    out = tmp_path / "big"
    chunk = 4 * 1024 * 1024  # 8 tensors of 16 MiB = 128 MiB on disk
    with ShardedWriter(out) as w:
        for i in range(8):
            w.add(f"t{i}", torch.full((chunk,), float(i)))
    before = _rss_bytes()
    with open_checkpoint(out) as r:
        t = r.get("t5")
        assert float(t[123]) == 5.0 and t.numel() == chunk
        grown = _rss_bytes() - before
    assert grown < 48 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
