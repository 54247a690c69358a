"""Atomic files and folders: a failed write leaves the old output, leftovers are found."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shoal._atomic import (
    atomic_path,
    remove_stale_temp_siblings,
    replace_dir,
    temp_sibling,
    write_text_atomic,
)


def _ended_pid() -> int:
    """The pid of a process that has exited."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout)


def test_temp_sibling_is_hidden_beside_the_output_and_names_this_process(tmp_path: Path) -> None:
    out = tmp_path / "model"
    assert temp_sibling(out) == tmp_path / f".model.tmp-{os.getpid()}"
    assert temp_sibling(out, "old") == tmp_path / f".model.old-{os.getpid()}"


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_write_text_atomic_replaces_the_file_and_makes_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "run" / "summary.json"
    write_text_atomic(path, "one")
    write_text_atomic(path, "two ü")
    assert path.read_text(encoding="utf-8") == "two ü"
    assert sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]


def test_replace_dir_swaps_in_the_new_folder_and_drops_the_old(tmp_path: Path) -> None:
    out, new = tmp_path / "best", tmp_path / "new"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_dir(new, out)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_replace_dir_puts_the_old_folder_back_when_the_new_one_cannot_move(
    tmp_path: Path,
) -> None:
    out = tmp_path / "best"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OSError):
        replace_dir(tmp_path / "never-written", out)
    assert (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_leftovers_of_ended_writers_go_and_live_ones_stay(tmp_path: Path) -> None:
    ended = _ended_pid()
    out = tmp_path / "out"
    own = tmp_path / f".out.tmp-{os.getpid()}"  # an earlier process with our pid
    dead = tmp_path / f".out.tmp-{ended}"
    live = tmp_path / f".out.tmp-{os.getppid()}"  # the test runner's parent is alive
    other = tmp_path / f".other.tmp-{ended}"  # another output's
    for path in (own, dead, live, other):
        path.mkdir()
    (dead / "model.safetensors").write_bytes(b"partial")
    remove_stale_temp_siblings(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_a_leftover_file_goes_too(tmp_path: Path) -> None:
    """Single files (a store entry, state.json) leave file siblings, not folders."""
    path = tmp_path / "store.safetensors"
    stale = tmp_path / f".store.safetensors.tmp-{_ended_pid()}"
    stale.write_bytes(b"partial")
    remove_stale_temp_siblings(path)
    assert not stale.exists()


def test_the_working_directory_is_refused_through_a_symlinked_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shoal._atomic import refuse_working_dir
    from shoal.errors import OutputExistsError

    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    monkeypatch.chdir(tmp_path / "real" / "sub")
    for out in (tmp_path / "link" / "sub", tmp_path / "real", Path(".")):
        with pytest.raises(OutputExistsError, match="working directory"):
            refuse_working_dir(out)
    refuse_working_dir(tmp_path / "link" / "other")  # a sibling is fine
    refuse_working_dir(tmp_path / "link")  # the link itself is only renamed aside
    # ".." after a symlink leaves from where the link points, as the filesystem goes
    (tmp_path / "real" / "x").mkdir()
    (tmp_path / "hop").symlink_to(tmp_path / "real" / "x", target_is_directory=True)
    with pytest.raises(OutputExistsError, match="working directory"):
        refuse_working_dir(tmp_path / "hop" / ".." / "sub")


def test_a_missing_extra_is_one_line_naming_it() -> None:
    import pytest

    from shoal._extras import import_extra
    from shoal.errors import ShoalError

    assert import_extra("json", "none", "a test").dumps([1]) == "[1]"
    with pytest.raises(ShoalError, match=r"pip install 'shoal\[demo\]'") as info:
        import_extra("shoal_no_such_module", "demo", "the frobnicator")
    assert "the frobnicator needs shoal_no_such_module" in str(info.value)
