"""One writer per run folder / merge output (an OS lock), leftovers of killed writers,
a run killed before its first evaluation, and a full disk: each a one-line error."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import toy_problem as tp
import yaml

from shoal._atomic import remove_stale_temp_siblings
from shoal.search.run_folder import RunFolder

HOLDER = """
import sys, time
from pathlib import Path
from shoal._atomic import hold_lock
with hold_lock(Path(sys.argv[1]), "test"):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def hold() -> Iterator[object]:
    """``hold(lock_path) -> Popen``: a process that holds the lock until killed."""
    procs: list[subprocess.Popen[str]] = []

    def start(lock: Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _dead_pid() -> int:
    """The pid of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _config(tmp_path: Path, evaluations: int = 4) -> Path:
    sources = tp.write_sources(tmp_path / "src")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tp.toy_config(sources, budget={"evaluations": evaluations})))
    return cfg


def _evolve(shoal_cli, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    return shoal_cli(["evolve", *args, "--run-dir", "runs/x", "--no-progress"], tmp_path)


def test_second_writer_is_refused_with_the_holders_pid(shoal_cli, tmp_path, hold) -> None:
    _config(tmp_path)
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    holder = hold(run / ".lock")
    for args in (["cfg.yaml"], ["--resume"]):
        code, _, err = _evolve(shoal_cli, tmp_path, *args)
        assert code == 2 and err.count("\n") == 1, err
        assert f"process {holder.pid}" in err and "runs/x" in err
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    code, out, err = _evolve(shoal_cli, tmp_path, "cfg.yaml")  # the lock died with it
    assert code == 0, err
    assert "4 evaluations" in out
    assert (run / ".lock").read_text().strip() == str(os.getpid())
    assert len((run / "events.jsonl").read_text().splitlines()) == 4


def test_second_merge_to_one_output_is_refused(shoal_cli, tmp_path, hold) -> None:
    sources = tp.write_sources(tmp_path / "src")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "merge_method: linear\nmodels:\n"
        + "".join(f"  - model: {p}\n    parameters: {{weight: 0.5}}\n" for p in sources.values())
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    holder = hold(tmp_path / ".out.lock")
    args = ["merge", str(recipe), str(out), "--overwrite"]
    code, _, err = shoal_cli(args, tmp_path)
    assert code == 2 and err.count("\n") == 1, err
    assert f"process {holder.pid}" in err
    assert (out / "keep.txt").read_text() == "precious"
    holder.kill()
    holder.wait()
    dead = _dead_pid()
    (tmp_path / f".out.old-{dead}").mkdir()  # a merge killed between its renames
    (tmp_path / f".out.old-{dead}" / "old.txt").write_text("old")
    live = tmp_path / f".out.old-{os.getppid()}"
    live.mkdir()
    code, _, err = shoal_cli(args, tmp_path)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "shoal_recipe.yaml").is_file()
    assert not (tmp_path / f".out.old-{dead}").exists() and live.is_dir()
    assert not (tmp_path / ".out.lock").exists()  # removed on release


def test_an_old_sibling_is_put_back_when_the_output_is_gone(tmp_path) -> None:
    out = tmp_path / "model"
    old = tmp_path / f".model.old-{_dead_pid()}"
    old.mkdir()
    (old / "w.txt").write_text("weights")
    remove_stale_temp_siblings(out)
    assert (out / "w.txt").read_text() == "weights" and not old.exists()


def test_resume_removes_leftovers_of_ended_writers_only(shoal_cli, tmp_path) -> None:
    _config(tmp_path, evaluations=4)
    code, _, err = _evolve(shoal_cli, tmp_path, "cfg.yaml", "--set", "budget.evaluations=2")
    assert code == 0, err
    run = tmp_path / "runs" / "x"
    dead, live = _dead_pid(), os.getppid()
    (run / "store").mkdir(exist_ok=True)
    for pid in (dead, live):
        (run / f".state.json.tmp-{pid}").write_text("{")
        (run / f".best.old-{pid}").mkdir()
        (run / "store" / f".0123abcd.safetensors.tmp-{pid}").write_bytes(b"half a model")
    code, _, err = _evolve(shoal_cli, tmp_path, "--resume")
    assert code == 0, err
    assert not (run / f".state.json.tmp-{dead}").exists()
    assert not (run / f".best.old-{dead}").exists()
    assert not (run / "store" / f".0123abcd.safetensors.tmp-{dead}").exists()
    assert (run / f".state.json.tmp-{live}").exists() and (run / f".best.old-{live}").is_dir()
    assert (run / "store" / f".0123abcd.safetensors.tmp-{live}").exists()


@pytest.mark.parametrize("left", [[".lock"], [".lock", "config.yaml", "events.jsonl", "store"]])
def test_a_run_killed_before_its_first_evaluation_is_no_run(
    shoal_cli, tmp_path, left: list[str]
) -> None:
    _config(tmp_path)
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    for name in left:
        if name == "store":
            (run / name).mkdir()
        else:
            (run / name).write_text("models: {}\n" if name == "config.yaml" else "")
    code, out, err = _evolve(shoal_cli, tmp_path, "cfg.yaml")
    assert code == 0, err
    assert "4 evaluations" in out
    assert RunFolder(run).read_state() is not None


def test_a_run_with_evaluations_still_refuses_a_fresh_start(shoal_cli, tmp_path) -> None:
    _config(tmp_path)
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("models: {}\n")
    (run / "events.jsonl").write_text('{"evaluation": 0}\n')
    code, _, err = _evolve(shoal_cli, tmp_path, "cfg.yaml")
    assert code == 2 and "already holds a run" in err


def _full_disk_on_call(monkeypatch, n: int) -> None:
    """The ``n``-th state write (from 1) fails as on a full disk."""
    real = RunFolder.write_state
    calls = {"n": 0}

    def write_state(self: RunFolder, state: dict) -> None:
        calls["n"] += 1
        if calls["n"] == n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.state))
        real(self, state)

    monkeypatch.setattr(RunFolder, "write_state", write_state)


def test_full_disk_during_the_run_is_one_line_and_resumable(
    shoal_cli, tmp_path, monkeypatch
) -> None:
    _config(tmp_path)
    _full_disk_on_call(monkeypatch, 2)  # after a first batch was saved
    code, _, err = _evolve(
        shoal_cli, tmp_path, "cfg.yaml", "--set", "batch_size=2", "--set", "checkpoint_seconds=0"
    )
    assert code == 2 and err.count("\n") == 1, err
    assert "state.json" in err and "ENOSPC" in err and "--resume" in err
    monkeypatch.undo()
    code, out, err = _evolve(shoal_cli, tmp_path, "--resume")
    assert code == 0, err
    assert "4 evaluations" in out


def test_full_disk_before_a_batch_is_saved_leaves_nothing(shoal_cli, tmp_path, monkeypatch) -> None:
    _config(tmp_path)
    _full_disk_on_call(monkeypatch, 1)
    code, _, err = _evolve(shoal_cli, tmp_path, "cfg.yaml")
    assert code == 2 and err.count("\n") == 1, err
    assert "ENOSPC" in err and "rerun" in err
    assert not (tmp_path / "runs").exists()


def test_full_disk_in_the_report_is_one_line(shoal_cli, tmp_path, monkeypatch) -> None:
    import shoal.report

    _config(tmp_path)

    def plot(data: object, path: Path) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(shoal.report, "plot_fitness", plot)
    code, _, err = _evolve(shoal_cli, tmp_path, "cfg.yaml")
    assert code == 2 and err.count("\n") == 1, err
    assert "fitness.png" in err and "EROFS" in err and "shoal report" in err
    assert RunFolder(tmp_path / "runs" / "x").read_summary() is not None
