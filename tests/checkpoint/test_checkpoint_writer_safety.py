"""The writer leaves either a complete output or nothing."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from shoal.checkpoint import ShardedWriter, open_checkpoint
from shoal.checkpoint import writer as writer_mod
from shoal.errors import CheckpointError, OutputExistsError


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _old_output(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    with ShardedWriter(out) as w:
        w.add("old", torch.ones(2))
        w.write_text("note.txt", "old")
    return out


@pytest.mark.parametrize("planned", [True, False])
def test_exception_mid_write_leaves_nothing(tmp_path: Path, planned: bool) -> None:
    plan = {"a": ((4,), torch.float32), "b": ((4,), torch.float32)} if planned else None
    with pytest.raises(RuntimeError, match="boom"), ShardedWriter(tmp_path / "out", plan=plan) as w:
        w.add("a", torch.ones(4))
        w.write_text("config.json", "{}")
        raise RuntimeError("boom")
    assert _listing(tmp_path) == []


def test_exception_keeps_the_old_output_when_overwriting(tmp_path: Path) -> None:
    out = _old_output(tmp_path)
    before = _listing(tmp_path)
    with pytest.raises(RuntimeError), ShardedWriter(out, overwrite=True) as w:
        w.add("new", torch.zeros(3))
        raise RuntimeError("boom")
    assert _listing(tmp_path) == before
    with open_checkpoint(out) as r:
        assert r.keys() == ["old"]


@pytest.mark.parametrize("planned", [True, False])
def test_disk_full_is_a_clean_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planned: bool
) -> None:
    calls = {"n": 0}
    real = writer_mod._tensor_bytes

    def failing(tensor: torch.Tensor) -> memoryview:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensor)

    monkeypatch.setattr(writer_mod, "_tensor_bytes", failing)
    plan = {"a": ((4,), torch.float32), "b": ((4,), torch.float32)} if planned else None
    with (
        pytest.raises(
            CheckpointError, match=r"tensor 'b' failed \(No space left on device, ENOSPC"
        ),
        ShardedWriter(tmp_path / "out", plan=plan) as w,
    ):
        w.add("a", torch.ones(4))
        w.add("b", torch.ones(4))
    assert _listing(tmp_path) == []


def test_failure_while_finishing_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_copy(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(writer_mod.shutil, "copyfileobj", broken_copy)
    with pytest.raises(CheckpointError, match="writing failed"), ShardedWriter(tmp_path / "o") as w:
        w.add("a", torch.ones(4))
    assert _listing(tmp_path) == []


def test_plan_violations(tmp_path: Path) -> None:
    plan = {"a": ((2,), torch.float32), "b": ((3,), torch.float16)}
    with (
        pytest.raises(CheckpointError, match=r"'b' is .* the plan says"),
        ShardedWriter(tmp_path / "o", plan=plan) as w,
    ):
        w.add("b", torch.ones(3))  # float32, plan says float16
    with (
        pytest.raises(CheckpointError, match="'c' is not in the write plan"),
        ShardedWriter(tmp_path / "o", plan=plan) as w,
    ):
        w.add("c", torch.ones(1))
    with (
        pytest.raises(CheckpointError, match=r"never written: \['b'\]"),
        ShardedWriter(tmp_path / "o", plan=plan) as w,
    ):
        w.add("a", torch.ones(2))
    with (
        pytest.raises(CheckpointError, match="'a' written twice"),
        ShardedWriter(tmp_path / "o") as w,
    ):
        w.add("a", torch.ones(2))
        w.add("a", torch.ones(2))
    assert _listing(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    out = _old_output(tmp_path)
    with pytest.raises(OutputExistsError, match="out: output exists"):
        ShardedWriter(out)
    with ShardedWriter(out, overwrite=True, max_shard_bytes=8) as w:
        w.add("x", torch.ones(2))
        w.add("y", torch.ones(2))
    assert _listing(tmp_path) == [
        "out",
        "out/model-00001-of-00002.safetensors",
        "out/model-00002-of-00002.safetensors",
        "out/model.safetensors.index.json",
    ]
    with open_checkpoint(out) as r:
        assert r.keys() == ["x", "y"]


def test_relative_paths_only(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="relative path"), ShardedWriter(tmp_path / "o") as w:
        w.write_text("../escape.txt", "x")
    assert _listing(tmp_path) == []


def test_nested_text_files_and_copies(tmp_path: Path) -> None:
    src = tmp_path / "src.txt"
    src.write_text("hello")
    with ShardedWriter(tmp_path / "o") as w:
        w.write_text("sub/dir/a.json", "{}")
        w.copy_file(src, "b.txt")
    assert (tmp_path / "o" / "sub" / "dir" / "a.json").read_text() == "{}"
    assert (tmp_path / "o" / "b.txt").read_text() == "hello"
    assert not (tmp_path / "o" / "model.safetensors").exists()  # no tensors, no weights file


def test_failure_while_creating_names_the_output_and_the_errno(tmp_path: Path) -> None:
    """The output, not its temporary sibling (which the user never asked for, and is gone)."""
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"file/out: cannot create \(.*, E[A-Z]+\)$"):
        ShardedWriter(tmp_path / "file" / "out").__enter__()
    assert _listing(tmp_path) == ["file"]


def test_interrupt_while_finishing_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted_copy(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_mod.shutil, "copyfileobj", interrupted_copy)
    with pytest.raises(KeyboardInterrupt), ShardedWriter(tmp_path / "o") as w:
        w.add("a", torch.ones(4))
    assert _listing(tmp_path) == []
