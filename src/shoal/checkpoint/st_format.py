"""The safetensors file layout: dtype names, header parsing and header building.

A safetensors file is ``<u64 little-endian N><N bytes of JSON header><data>``.
The header maps each tensor name to ``{"dtype", "shape", "data_offsets"}`` where
the offsets are relative to the start of the data block, and the tensors tile
the data block without gaps. Parsing the header reads only its ``8 + N`` bytes,
so shape and dtype are known without touching tensor data.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from shoal.errors import CheckpointError

# the header may not be larger than this (the safetensors library uses 100 MB too)
MAX_HEADER_BYTES = 100 * 1000 * 1000

DTYPE_FROM_ST: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
ST_FROM_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_FROM_ST.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from a header only.

    Attributes:
        file: the file holding it.
        shape: its shape.
        dtype: its torch dtype.
        begin: byte offset of its data, relative to the data block.
        end: one past its last byte, relative to the data block.
    """

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    begin: int
    end: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.begin


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` → ``"BF16"``)."""
    try:
        return ST_FROM_DTYPE[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate the header of a safetensors file.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        ``(tensors, metadata)``: tensor name → :class:`TensorInfo` in file (offset)
        order, and the ``__metadata__`` string map (empty if absent).

    Raises:
        CheckpointError: naming the file, if it is unreadable, truncated, its header
            is not valid JSON, or any tensor's offsets fall outside the file or do
            not match its shape and dtype.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file "
                    f"(header claims {n} bytes, file has {size})"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - n
    meta = header.pop("__metadata__", None) or {}
    infos: list[tuple[str, TensorInfo]] = []
    for name, entry in header.items():
        infos.append((name, _entry(path, name, entry, data_size)))
    infos.sort(key=lambda item: item[1].begin)
    return dict(infos), {str(k): str(v) for k, v in dict(meta).items()}


def _entry(path: Path, name: str, entry: object, data_size: int) -> TensorInfo:
    """Validate one header entry against the file size."""
    try:
        assert isinstance(entry, dict)
        dtype = DTYPE_FROM_ST[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
    except (AssertionError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
    expected = math.prod(shape) * dtype.itemsize
    if any(d < 0 for d in shape) or begin < 0 or end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r} has offsets [{begin}, {end}) that do not fit "
            f"shape {list(shape)} and dtype {entry['dtype']}"
        )
    if end > data_size:
        raise CheckpointError(
            f"{path}: truncated: tensor {name!r} ends at byte {end} of the data block, "
            f"which has only {data_size} bytes"
        )
    return TensorInfo(file=path, shape=shape, dtype=dtype, begin=begin, end=end)


def build_header(
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, int]:
    """Lay tensors out back to back and build the header bytes for them.

    Args:
        entries: ``(name, shape, dtype)`` in the order their data will be written.
        metadata: ``__metadata__`` strings besides ``format: pt``, written sorted by key (the
            same bytes in every process, unlike safetensors' own writer).

    Returns:
        ``(prefix, data_size)``: the 8-byte length plus the JSON header, padded with
        spaces to a multiple of 8 bytes, and the total size of the data block.
    """
    meta = {"format": "pt", **(metadata or {})}
    header: dict[str, object] = {"__metadata__": dict(sorted(meta.items()))}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": dtype_name(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data block starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offset
