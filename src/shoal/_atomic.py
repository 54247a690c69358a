"""Writing files and folders so that a reader never sees half of one.

Every output of shoal (checkpoints, run files, reports, testbeds) is written under a
temporary sibling ``.<name>.tmp-<pid>`` and renamed onto its final name when complete;
a rename within one folder is atomic on POSIX filesystems. A process killed outright
cannot clean up, so a later write to the same output removes siblings whose process
has ended (:func:`remove_stale_temp_siblings`). The naming lives here, once, so that
the cleanup recognises every writer's leftovers.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shoal.errors import OutputExistsError

__all__ = [
    "atomic_path",
    "refuse_working_dir",
    "remove_stale_temp_siblings",
    "replace_dir",
    "temp_sibling",
    "write_text_atomic",
]


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """``path``'s hidden sibling ``.<name>.<tag>-<pid>`` for this process."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling to write; rename it onto ``path`` if the block succeeds.

    The temporary file is removed whatever happens, so a failed write leaves ``path``
    as it was.
    """
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a synced temporary sibling."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def refuse_working_dir(out: Path) -> None:
    """Refuse ``out`` as a folder to replace when it is, or holds, the working directory.

    Replacing it would delete the folder the user stands in (``shoal merge r.yaml .
    --overwrite``).

    Raises:
        OutputExistsError: If ``out`` is the working directory or one of its parents.
    """
    # the working directory comes with symlinks resolved; so must the output's parent
    # (a final symlink is only renamed aside, which leaves what it points to alone),
    # resolved before any ".." is applied, as the filesystem does
    joined = os.path.join(os.getcwd(), out)
    head, name = os.path.split(joined)
    if name in ("", ".", ".."):
        where = Path(os.path.realpath(joined))
    else:
        where = Path(os.path.realpath(head)) / name
    cwd = Path.cwd()
    if where == cwd or where in cwd.parents:
        raise OutputExistsError(
            f"{out}: is the working directory or holds it; name a new folder for the output"
        )


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` onto ``out``, replacing an existing ``out``.

    The old ``out`` is moved aside first and deleted last; if the second rename
    fails it is put back, so ``out`` is always either the old or the new folder.

    Raises:
        OutputExistsError: If ``out`` is the working directory or holds it.
    """
    refuse_working_dir(out)
    if not out.exists():
        os.rename(tmp, out)
        return
    old = temp_sibling(out, "old")
    if old.exists():
        shutil.rmtree(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temp_siblings(path: Path) -> None:
    """Delete ``.<name>.tmp-<pid>`` siblings of ``path`` left by ended processes.

    This process's own pid counts as ended: a sibling under it is the leftover of an
    earlier process that had the same pid, since a write removes its own when done.
    The pid is the only evidence, so on a filesystem shared between hosts a live
    writer on another host would look ended.
    """
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _process_alive(int(pid))):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
