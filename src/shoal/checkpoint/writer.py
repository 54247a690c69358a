"""Streaming, atomic writer of (sharded) safetensors checkpoints.

Tensors are written as they arrive, so memory stays at one tensor. Everything goes
to a temporary sibling directory ``.<name>.tmp-<pid>`` that is renamed onto the
output only when the ``with`` block ends cleanly; on any error the temporary
directory is removed and the output is left as it was. A write killed outright
(SIGKILL, power cut) cannot clean up; the next write to the same output removes
its leftover (:func:`shoal._atomic.remove_stale_temp_siblings`).

Two modes:

* **with a plan** (``plan={name: (shape, dtype)}``, in write order): the shard
  layout and every header are known up front; each tensor's bytes are written at
  their final offset, in any order of ``add`` calls.
* **without a plan**: each shard's data is appended to a scratch file and the
  header is prepended when the shard is complete (one extra sequential copy).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from shoal._atomic import (
    refuse_working_dir,
    remove_stale_temp_siblings,
    replace_dir,
    temp_sibling,
)
from shoal.checkpoint.st_format import build_header, dtype_name
from shoal.errors import CheckpointError, OutputExistsError

Plan = dict[str, tuple[tuple[int, ...], torch.dtype]]
_COPY_CHUNK = 16 * 1024 * 1024


def shard_name(i: int, n: int) -> str:
    """File name of shard ``i`` (0-based) of ``n`` in the Hugging Face convention."""
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a Python-level copy."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")  # type: ignore[arg-type]


class ShardedWriter:
    """Write a checkpoint directory atomically, one tensor at a time.

    Args:
        out_dir: the directory to produce.
        plan: optional ``{name: (shape, dtype)}`` in write order; fixes the layout.
        max_shard_bytes: start a new shard when the next tensor would exceed this
            (a single larger tensor gets a shard of its own).
        overwrite: replace ``out_dir`` if it exists (old one renamed aside, new one
            renamed in, old one deleted).

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false.

    Example:
        >>> with ShardedWriter(out, max_shard_bytes=parse_size("2GB")) as w:  # doctest: +SKIP
        ...     for name in reader.keys():
        ...         w.add(name, reader.get(name))
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        plan: Plan | None = None,
        max_shard_bytes: int = 2 * 1024**3,
        overwrite: bool = False,
    ) -> None:
        self.out_dir = Path(os.path.abspath(out_dir))  # "o/.." and "." have a name
        self.max_shard_bytes = int(max_shard_bytes)
        self.overwrite = overwrite
        if self.max_shard_bytes <= 0:
            raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self._check_out_dir()
        self.tmp_dir = temp_sibling(self.out_dir)
        self._plan: Plan | None = None
        self._written: set[str] = set()
        self._entered = False
        # plan mode: name -> (shard index, absolute offset in that shard file)
        self._slots: dict[str, tuple[int, int]] = {}
        self._shard_files: list[BinaryIO] = []
        # streaming mode: per shard, the list of (name, shape, dtype) and its byte count
        self._shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = []
        self._shard_bytes: list[int] = []
        self._scratch: BinaryIO | None = None
        if plan is not None:
            self._plan = {n: (tuple(int(d) for d in s), dt) for n, (s, dt) in plan.items()}

    # -- lifecycle -------------------------------------------------------------------

    def _check_out_dir(self) -> None:
        refuse_working_dir(self.out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise OutputExistsError(f"{self.out_dir}: exists and is not a directory")
        if self.out_dir.exists() and not self.overwrite:
            raise OutputExistsError(
                f"{self.out_dir}: output exists (pass overwrite / --overwrite to replace it)"
            )

    def __enter__(self) -> ShardedWriter:
        self._check_out_dir()
        with self._cleanup_on_failure(f"{self.out_dir}: cannot create"):
            remove_stale_temp_siblings(self.out_dir)  # also a leftover under our own pid
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.tmp_dir.mkdir()
            if self._plan is not None:
                self._open_planned_shards(self._plan)
        self._entered = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._cleanup()
            return
        with self._cleanup_on_failure(f"{self.out_dir}: writing failed"):
            self._finish()
            self._swap_in()

    @contextlib.contextmanager
    def _cleanup_on_failure(self, what: str) -> Iterator[None]:
        """On any exception in the block, remove the partial output and re-raise; an
        ``OSError`` becomes a :class:`CheckpointError` reading ``"{what} ({error})"``."""
        try:
            yield
        except OSError as exc:
            self._cleanup()
            # strerror alone: the file named in str(exc) is the temporary sibling, gone now
            raise CheckpointError(f"{what} ({_reason(exc)})") from exc
        except BaseException:
            self._cleanup()
            raise

    def _cleanup(self) -> None:
        for fh in [*self._shard_files, *([self._scratch] if self._scratch else [])]:
            with contextlib.suppress(OSError):
                fh.close()
        self._shard_files = []
        self._scratch = None
        self._entered = False
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _swap_in(self) -> None:
        if self.out_dir.exists() and not self.overwrite:  # appeared while we were writing
            raise OutputExistsError(f"{self.out_dir}: output appeared during the write")
        replace_dir(self.tmp_dir, self.out_dir)
        self._entered = False

    # -- planned layout --------------------------------------------------------------

    def _open_planned_shards(self, plan: Plan) -> None:
        groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = []
        size = 0
        for name, (shape, dtype) in plan.items():
            dtype_name(dtype)  # fail early on an unstorable dtype
            nb = _nbytes(shape, dtype)
            if not groups or (size + nb > self.max_shard_bytes and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append((name, shape, dtype))
            size += nb
        self._shards = groups
        for i, group in enumerate(groups):
            prefix, data_size = build_header(group)
            fh = (self.tmp_dir / shard_name(i, len(groups))).open("w+b")
            self._shard_files.append(fh)
            fh.write(prefix)
            fh.truncate(len(prefix) + data_size)  # sparse until the data is written
            offset = len(prefix)
            for name, shape, dtype in group:
                self._slots[name] = (i, offset)
                offset += _nbytes(shape, dtype)

    # -- adding tensors --------------------------------------------------------------

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor.

        Args:
            name: tensor name (unique).
            tensor: its value, written in its own dtype (cast before calling).

        Raises:
            CheckpointError: duplicate name, a name or shape/dtype not in the plan,
                or a write failure (disk full...); the message names the tensor.
        """
        if not self._entered:
            raise CheckpointError(f"{self.out_dir}: add({name!r}) outside the `with` block")
        if name in self._written:
            raise CheckpointError(f"{self.out_dir}: tensor {name!r} written twice")
        shape = tuple(tensor.shape)
        try:
            data = _tensor_bytes(tensor)
            if self._plan is not None:
                self._add_planned(name, shape, tensor.dtype, data)
            else:
                self._add_streamed(name, shape, tensor.dtype, data)
        except OSError as exc:
            raise CheckpointError(
                f"{self.out_dir}: writing tensor {name!r} failed ({_reason(exc)})"
            ) from exc
        self._written.add(name)

    def _add_planned(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, data: memoryview
    ) -> None:
        assert self._plan is not None
        if name not in self._plan:
            raise CheckpointError(f"{self.out_dir}: tensor {name!r} is not in the write plan")
        if (shape, dtype) != self._plan[name]:
            want_shape, want_dtype = self._plan[name]
            raise CheckpointError(
                f"{self.out_dir}: tensor {name!r} is {list(shape)} {dtype}, "
                f"the plan says {list(want_shape)} {want_dtype}"
            )
        shard, offset = self._slots[name]
        fh = self._shard_files[shard]
        fh.seek(offset)
        fh.write(data)

    def _add_streamed(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, data: memoryview
    ) -> None:
        dtype_name(dtype)
        nb = len(data)
        if not self._shards or (
            self._shard_bytes[-1] + nb > self.max_shard_bytes and self._shards[-1]
        ):
            if self._scratch is not None:
                self._scratch.close()
            self._scratch = self._scratch_path(len(self._shards)).open("wb")
            self._shards.append([])
            self._shard_bytes.append(0)
        assert self._scratch is not None
        self._scratch.write(data)
        self._shards[-1].append((name, shape, dtype))
        self._shard_bytes[-1] += nb

    def _scratch_path(self, i: int) -> Path:
        return self.tmp_dir / f".shard-{i}.data"

    # -- other files -----------------------------------------------------------------

    def _target(self, relpath: str | Path) -> Path:
        rel = Path(relpath)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise CheckpointError(f"{relpath}: must be a relative path inside the output")
        if not self._entered:
            raise CheckpointError(f"{self.out_dir}: writing {relpath} outside the `with` block")
        target = self.tmp_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_text(self, relpath: str | Path, text: str) -> None:
        """Write a text file (e.g. ``config.json``) into the output directory."""
        try:
            self._target(relpath).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CheckpointError(
                f"{self.out_dir}: writing {relpath} failed ({_reason(exc)})"
            ) from exc

    def copy_file(self, src: str | Path, relpath: str | Path) -> None:
        """Copy a file (e.g. ``tokenizer.json``) into the output directory."""
        try:
            shutil.copyfile(src, self._target(relpath))
        except OSError as exc:
            raise CheckpointError(f"{src}: copying to {self.out_dir} failed ({exc})") from exc

    # -- completion ------------------------------------------------------------------

    def _finish(self) -> None:
        if self._plan is not None:
            missing = [n for n in self._plan if n not in self._written]
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise CheckpointError(
                    f"{self.out_dir}: planned tensors never written: {missing[:3]}{more}"
                )
            for fh in self._shard_files:
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()
            self._shard_files = []
        else:
            if self._scratch is not None:
                self._scratch.close()
                self._scratch = None
            n = len(self._shards)
            for i, group in enumerate(self._shards):
                prefix, _ = build_header(group)
                scratch = self._scratch_path(i)
                with (self.tmp_dir / shard_name(i, n)).open("wb") as out, scratch.open("rb") as src:
                    out.write(prefix)
                    shutil.copyfileobj(src, out, _COPY_CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
                scratch.unlink()
        if len(self._shards) > 1:
            self._write_index()

    def _write_index(self) -> None:
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        total = 0
        for i, group in enumerate(self._shards):
            for name, shape, dtype in group:
                weight_map[name] = shard_name(i, n)
                total += _nbytes(shape, dtype)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.tmp_dir / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n", encoding="utf-8"
        )

    @property
    def num_shards(self) -> int:
        """Number of shards so far (final once the plan is set or the block ended)."""
        return len(self._shards)


def _reason(exc: OSError) -> str:
    """What the system said, with its errno name (``File too large, EFBIG``)."""
    import errno

    code = errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or str(exc)
    return f"{text}, {code}" if code else text
