"""Writing files and folders so that a reader never sees half of one.

Every output of shoal (checkpoints, run files, reports, testbeds) is written under a
temporary sibling ``.<name>.tmp-<pid>`` and renamed onto its final name when complete;
a rename within one folder is atomic on POSIX filesystems. A process killed outright
cannot clean up, so a later write to the same output removes siblings whose process
has ended (:func:`remove_stale_temp_siblings`). The naming lives here, once, so that
the cleanup recognises every writer's leftovers.

A writer that must be alone on an output (a run folder, a merge's output) holds an OS
lock on a lock file (:func:`hold_lock`); the kernel drops it with the process, so a
kill never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from shoal.errors import OutputExistsError, ShoalError

__all__ = [
    "atomic_path",
    "hold_lock",
    "process_alive",
    "refuse_output_holding",
    "refuse_working_dir",
    "remove_stale_temp_files",
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
        _usual_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_umask() -> int:
    """The process's umask, read once at import: ``os.umask`` can only read it by setting
    it, which a thread creating a file at that moment would see."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _usual_mode(path: Path) -> None:
    """Give a written file (or every file of a written folder) the mode ``open`` would:
    0666 less the umask. safetensors writes its files 0600, so a model folder a user hands
    on would otherwise be readable by its owner alone."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        if f.is_symlink():
            continue
        with contextlib.suppress(OSError):  # a filesystem without modes (vfat, some mounts)
            f.chmod((f.stat().st_mode & 0o111 | 0o666) & ~_UMASK)


@contextmanager
def atomic_dir(out: Path, tag: str = "tmp") -> Iterator[Path]:
    """Yield a temporary sibling folder path to fill; it replaces ``out`` if the block
    succeeds (:func:`replace_dir`).

    The path is yielded absent (the block makes it, or a writer such as
    ``save_pretrained`` does), and whatever is left of it is removed afterwards, so a
    failed write leaves ``out`` as it was and no temporary folder behind.
    """
    tmp = temp_sibling(out, tag)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if tmp.exists():
            _usual_mode(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a synced temporary sibling.

    Raises:
        OSError: The write failed (full or read-only disk); it names ``path``, not the
            temporary sibling, and ``path`` is left as it was.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


# what a read-only, full or refusing disk raises on creating a file
_DISK_ERRNOS = {
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EACCES,
    errno.EPERM,
    errno.EIO,
}


def _lock_holder(fd: int) -> str:
    """The pid the holder of a lock wrote into it (it may not have written it yet)."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return f"process {text}"
        time.sleep(0.01)
    return "another process"


@contextmanager
def hold_lock(
    lock: Path,
    what: str,
    *,
    error: type[ShoalError] = OutputExistsError,
    remove: bool = False,
) -> Iterator[None]:
    """Hold an exclusive OS lock (``flock``) on the file ``lock`` for the block.

    The lock file holds the holder's pid. The kernel releases the lock when the process
    ends, however it ends, so a lock is never stale; the file itself may stay.

    Args:
        lock: The lock file (created if missing; its folder must exist).
        what: How a refusal names the locked thing (``runs/x``), first on its line.
        error: The error a refusal raises.
        remove: Delete the lock file on release (when it lies outside the output).

    Raises:
        ShoalError: (``error``) Another process holds the lock; the message names its pid.
            (``ShoalError``) The disk refuses the lock file (read-only, full).
    """
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # a read-only or full disk: one line, as for the output
            if exc.errno not in _DISK_ERRNOS:
                raise
            raise ShoalError(
                f"{what}: cannot create the lock {lock} ({exc.strerror or os.strerror(exc.errno)})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _lock_holder(fd)
            os.close(fd)
            raise error(f"{what}: in use by {holder} (lock {lock}); wait for it to end") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder removed after we opened it
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        if remove:
            with contextlib.suppress(OSError):
                lock.unlink()
        os.close(fd)


def refuse_output_holding(out: Path, inputs: Mapping[str, str | Path]) -> None:
    """Refuse an existing ``out`` that is, or holds, the working directory or one of
    ``inputs`` (what to call it in the message -> its path): replacing ``out`` once the work
    is done (``--overwrite``) would delete what the user stands in or the work read.

    Raises:
        OutputExistsError: :func:`refuse_working_dir`'s line, or
            ``{out}: holds {label}; write elsewhere``.
    """
    refuse_working_dir(out)
    if not out.exists():
        return
    target = out.resolve()
    for label, path in inputs.items():
        source = Path(path).resolve()
        if source == target or target in source.parents:
            raise OutputExistsError(f"{out}: holds {label}; write elsewhere")


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


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (``os.kill(pid, 0)``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temp_files(directory: Path) -> None:
    """:func:`remove_stale_temp_siblings` of every file in ``directory`` that has a
    temporary sibling (``.<name>.tmp-<pid>``), such as a store's models."""
    for tmp in sorted(directory.glob(".*.tmp-*")):
        remove_stale_temp_siblings(directory / tmp.name[1:].rsplit(".tmp-", 1)[0])


def remove_stale_temp_siblings(path: Path) -> None:
    """Delete ``.<name>.tmp-<pid>`` and ``.<name>.old-<pid>`` siblings of ``path`` left
    by ended processes.

    An ``old`` sibling is the previous ``path`` that :func:`replace_dir` moved aside; a
    kill between its two renames leaves no ``path`` at all, and then the ``old`` sibling
    is put back instead of deleted. This process's own pid counts as ended: a sibling
    under it is the leftover of an earlier process that had the same pid, since a write
    removes its own when done. The pid is the only evidence, so on a filesystem shared
    between hosts a live writer on another host would look ended.
    """
    for tag in ("old", "tmp"):
        for stale in sorted(path.parent.glob(f".{glob.escape(path.name)}.{tag}-*")):
            pid = stale.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or (int(pid) != os.getpid() and process_alive(int(pid))):
                continue
            if tag == "old" and not os.path.lexists(path):
                os.rename(stale, path)
            elif stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
