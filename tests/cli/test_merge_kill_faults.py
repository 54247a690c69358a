"""``shoal merge`` under faults the OS causes: kill -9 at any moment (the output is either
absent or whole, and a rerun is byte-identical), a file-size limit (EFBIG) and a read-only
disk (EROFS): one line, exit 2, nothing left."""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

NAMES = (
    "model.embed_tokens.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
)


def _model(root: Path, name: str, seed: int, rows: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    path = root / name
    path.mkdir(parents=True)
    tensors = {n: torch.randn(rows, 256, generator=gen) for n in NAMES}
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return path


def _recipe(tmp_path: Path, rows: int) -> Path:
    models = tmp_path / "models"
    base, a, b = (_model(models, n, s, rows) for n, s in (("base", 0), ("a", 1), ("b", 2)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
        f"  - model: {a}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.4, density: 0.5}}\n"
    )
    return recipe


def _merge_cmd(recipe: Path, out: Path) -> list[str]:
    # 1 MB shards: the output is written as several files, one after another
    args = [str(recipe), str(out), "--seed", "5", "--out-shard-size", "1MB", "-q"]
    return [sys.executable, "-m", "shoal.cli.main", "merge", *args]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_a_whole_output_or_none(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, rows=2048)  # 5 tensors of 2 MB per model
    ref = tmp_path / "ref"
    subprocess.run(_merge_cmd(recipe, ref), check=True, capture_output=True, timeout=120)
    reference = _tree(ref)
    assert sum(name.endswith(".safetensors") for name in reference) > 1
    rng = random.Random(18)
    out = tmp_path / "out"
    during_write = 0
    for attempt in range(4):
        proc = subprocess.Popen(_merge_cmd(recipe, out), stderr=subprocess.PIPE)
        if attempt % 2 == 0:  # while the shards are being written
            deadline = time.monotonic() + 60
            while not any(".tmp-" in n for n in _leftovers(out)) and proc.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.02))
        else:  # at a random moment of the whole command
            time.sleep(rng.uniform(0.0, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        during_write += any(".tmp-" in n for n in _leftovers(out))
        if out.exists():  # the rename came first: the output is whole
            assert _tree(out) == reference
        code = subprocess.run(_merge_cmd(recipe, out), capture_output=True, timeout=120)
        if out.exists() and code.returncode == 2:  # a whole output was already there
            assert b"--overwrite" in code.stderr
        else:
            assert code.returncode == 0, code.stderr
        assert _tree(out) == reference  # byte-identical to an uninterrupted merge
        assert _leftovers(out) == []  # the rerun removed the killed writer's temp folder
        for path in out.iterdir():
            path.unlink()
        out.rmdir()
    assert during_write >= 1  # at least one kill hit the write itself


def _limit_file_size(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_file_size_limit_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """Under ``ulimit -f`` a write fails with EFBIG (Python ignores SIGXFSZ)."""
    recipe = _recipe(tmp_path, rows=64)  # 64 KB per tensor: the first shard passes 100 KB
    out = tmp_path / "out"
    proc = subprocess.run(
        _merge_cmd(recipe, out),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: _limit_file_size(100_000),
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    # it names the output, not its temporary sibling (.out.tmp-PID, removed), and the errno
    assert f"error: {out}: " in lines[0] and ".tmp-" not in lines[0]
    assert os.strerror(errno.EFBIG) in lines[0] and "EFBIG" in lines[0]
    assert not out.exists() and _leftovers(out) == []


@pytest.mark.parametrize("below", ["out", "new/folders/out"], ids=["in-it", "missing-parents"])
def test_read_only_disk_is_one_line_and_leaves_nothing(
    tmp_path: Path, shoal_cli, monkeypatch, below: str
) -> None:
    """Every create on the disk fails with EROFS, as on a read-only mount (the tests run
    as root, whom file modes do not stop): in the output's folder, or in the first of its
    parent folders that do not exist yet."""
    recipe = _recipe(tmp_path, rows=8)
    disk = tmp_path / "ro"
    disk.mkdir()
    out = disk / below
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(path: object) -> None:
        if Path(os.fsdecode(path)).resolve().parent == disk.resolve():  # type: ignore[arg-type]
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))  # type: ignore[arg-type]

    def ro_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def ro_mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)
    code, _, err = shoal_cli(["merge", str(recipe), str(out), "-q"])
    monkeypatch.undo()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(out) in lines[0] and os.strerror(errno.EROFS) in lines[0]
    assert list(disk.iterdir()) == []
