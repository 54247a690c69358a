"""Lazy, read-only access to the tensors of a checkpoint on disk.

:func:`open_checkpoint` accepts a Hugging Face model directory (single or sharded
safetensors, or ``pytorch_model.bin`` with or without an index, or one ``*.pt``),
a single ``.safetensors`` file, or a ``.pt`` / ``.bin`` state-dict file. Shapes and
dtypes come from the safetensors headers alone; tensor data is read one tensor at
a time through memory-mapped ``safe_open``. Pickled files are read only through
``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from shoal._closing import Closing
from shoal.checkpoint.files import read_config
from shoal.checkpoint.st_format import TensorInfo, read_header
from shoal.errors import CheckpointError, first_line

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"
# a diffusers model folder (a pipeline's unet/, vae/, ...) names its weights this way
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_SINGLE = "diffusion_pytorch_model.safetensors"
DIFFUSERS_TORCH_INDEX = "diffusion_pytorch_model.bin.index.json"
DIFFUSERS_TORCH_SINGLE = "diffusion_pytorch_model.bin"


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open a checkpoint for lazy reading.

    Args:
        path: a model directory, a ``.safetensors`` file, or a ``.pt`` / ``.bin`` file.

    Returns:
        A :class:`CheckpointReader`; use it as a context manager or call ``close()``.

    Raises:
        CheckpointError: the path is missing, holds no weights, or is corrupt; the
            message names the path (and the tensor, where one is at fault).
    """
    return CheckpointReader(Path(path))


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of the checkpoint at ``path``, from its headers only (a ``.bin``
    is loaded to learn them).

    Raises:
        CheckpointError: as :func:`open_checkpoint`.
    """
    with open_checkpoint(path) as reader:
        return {name: tuple(reader.shape(name)) for name in reader}


Shapes = Mapping[str, tuple[int, ...]]


def first_mismatch(want: Shapes, got: Shapes) -> tuple[str, str] | None:
    """Where two shape tables first differ: ``(name, "missing")`` for a tensor of ``want``
    that ``got`` lacks, ``(name, "shape")`` for one of another shape (both in ``want``'s
    order), then ``(name, "extra")`` for one only ``got`` has; ``None`` when they are equal.
    Callers word the message (which side is the reference is theirs to say)."""
    for name, shape in want.items():
        if name not in got:
            return name, "missing"
        if tuple(got[name]) != tuple(shape):
            return name, "shape"
    extra = next((name for name in got if name not in want), None)
    return None if extra is None else (extra, "extra")


class CheckpointReader(Closing):
    """Tensors of one checkpoint, read lazily.

    Attributes:
        path: the path given to :func:`open_checkpoint`.
        config: the parsed ``config.json`` beside the weights, or ``None``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.config: dict[str, Any] | None = None
        # name -> where it is: a safetensors TensorInfo, or the torch file holding it
        self._st: dict[str, TensorInfo] = {}
        self._pt: dict[str, Path] = {}
        self._order: list[str] = []
        self._handles: dict[Path, Any] = {}
        self._pt_loaded: dict[Path, dict[str, torch.Tensor]] = {}
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory")
        if path.is_dir():
            self._open_dir(path)
        else:
            self._open_file(path)
        if not self._order:
            raise CheckpointError(f"{path}: no weights found (the checkpoint holds no tensors)")

    # -- discovery -------------------------------------------------------------------

    def _open_dir(self, d: Path) -> None:
        cfg = d / "config.json"
        if cfg.is_file():
            self.config = read_config(cfg)
        if (d / SAFETENSORS_INDEX).is_file():
            self._open_index(d / SAFETENSORS_INDEX, safetensors=True)
        elif (d / SAFETENSORS_SINGLE).is_file():
            self._open_safetensors(d / SAFETENSORS_SINGLE)
        elif (d / DIFFUSERS_INDEX).is_file():
            self._open_index(d / DIFFUSERS_INDEX, safetensors=True)
        elif (d / DIFFUSERS_SINGLE).is_file():
            self._open_safetensors(d / DIFFUSERS_SINGLE)
        elif (d / TORCH_INDEX).is_file():
            self._open_index(d / TORCH_INDEX, safetensors=False)
        elif (d / TORCH_SINGLE).is_file():
            self._open_torch(d / TORCH_SINGLE)
        elif (d / DIFFUSERS_TORCH_INDEX).is_file():
            self._open_index(d / DIFFUSERS_TORCH_INDEX, safetensors=False)
        elif (d / DIFFUSERS_TORCH_SINGLE).is_file():
            self._open_torch(d / DIFFUSERS_TORCH_SINGLE)
        else:
            st = sorted(d.glob("*.safetensors"))
            pt = sorted(p for ext in ("*.pt", "*.pth", "*.bin") for p in d.glob(ext))
            candidates = st or pt
            if len(candidates) == 1:
                self._open_file(candidates[0])
            elif not candidates:
                raise CheckpointError(
                    f"{d}: no weights found (expected {SAFETENSORS_SINGLE}, "
                    f"{SAFETENSORS_INDEX}, {TORCH_SINGLE}, {DIFFUSERS_SINGLE}, or one "
                    "*.safetensors / *.pt file)"
                )
            else:
                names = ", ".join(p.name for p in candidates)
                raise CheckpointError(
                    f"{d}: several weight files ({names}) and no index file; "
                    f"pass one file or add {SAFETENSORS_INDEX}"
                )

    def _open_file(self, f: Path) -> None:
        if f.suffix == ".safetensors":
            self._open_safetensors(f)
        elif f.suffix in {".pt", ".pth", ".bin"}:
            self._open_torch(f)
        elif f.name.endswith(".index.json"):
            self._open_index(f, safetensors=f.name.endswith(".safetensors.index.json"))
        else:
            raise CheckpointError(
                f"{f}: unknown weight file type (expected .safetensors, .pt, .pth or .bin)"
            )

    def _open_safetensors(self, f: Path) -> None:
        infos, _ = read_header(f)
        for name, info in infos.items():
            self._st[name] = info
            self._order.append(name)

    def _open_torch(self, f: Path) -> None:
        for name in self._load_torch(f):
            self._pt[name] = f
            self._order.append(name)

    def _open_index(self, index: Path, *, safetensors: bool) -> None:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
            raise CheckpointError(f"{index}: not a valid index file ({exc!r})") from exc
        headers: dict[Path, dict[str, TensorInfo]] = {}
        for name, shard_name in weight_map.items():
            shard = index.parent / str(shard_name)
            if not shard.is_file():
                raise CheckpointError(
                    f"{index}: shard {shard_name!r} listed for tensor {name!r} does not exist"
                )
            if safetensors:
                if shard not in headers:
                    headers[shard] = read_header(shard)[0]
                if name not in headers[shard]:
                    raise CheckpointError(
                        f"{shard}: tensor {name!r} is listed in {index.name} but missing "
                        "from this shard"
                    )
                self._st[name] = headers[shard][name]
            else:
                if name not in self._load_torch(shard):
                    raise CheckpointError(
                        f"{shard}: tensor {name!r} is listed in {index.name} but missing "
                        "from this shard"
                    )
                self._pt[name] = shard
            self._order.append(name)

    def _load_torch(self, f: Path) -> dict[str, torch.Tensor]:
        """Memory-map a pickled state dict (weights only; no code runs)."""
        if f in self._pt_loaded:
            return self._pt_loaded[f]
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise _not_plain_tensors(f) from exc
        except RuntimeError as exc:
            if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                raise CheckpointError(f"{f}: cannot load ({first_line(exc)})") from exc
            # legacy (non-zip) torch.save format cannot be memory-mapped
            try:
                obj = torch.load(f, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc2:
                raise _not_plain_tensors(f) from exc2
            except Exception as exc2:
                raise CheckpointError(f"{f}: cannot load ({first_line(exc2)})") from exc2
        except Exception as exc:
            raise CheckpointError(
                f"{f}: cannot load as a weights-only state dict ({first_line(exc)})"
            ) from exc
        if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = obj.get("state_dict", obj.get("model"))
            obj = inner if isinstance(inner, dict) else obj
        if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
        ):
            raise CheckpointError(f"{f}: not a state dict (a mapping of names to tensors)")
        self._pt_loaded[f] = obj
        return obj

    # -- queries ---------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Tensor names in file order (index order for sharded checkpoints)."""
        return list(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._st or name in self._pt

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def _missing(self, name: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: no tensor named {name!r} in this checkpoint")

    def _pt_tensor(self, name: str) -> torch.Tensor:
        return self._load_torch(self._pt[name])[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor, read from the header only."""
        if name in self._st:
            return self._st[name].shape
        if name in self._pt:
            return tuple(self._pt_tensor(name).shape)
        raise self._missing(name)

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of a tensor, read from the header only."""
        if name in self._st:
            return self._st[name].dtype
        if name in self._pt:
            return self._pt_tensor(name).dtype
        raise self._missing(name)

    def numel(self, name: str) -> int:
        """Number of elements of a tensor."""
        return math.prod(self.shape(name))

    def file_of(self, name: str) -> Path:
        """The file that holds a tensor."""
        if name in self._st:
            return self._st[name].file
        if name in self._pt:
            return self._pt[name]
        raise self._missing(name)

    def nbytes(self) -> int:
        """Total bytes of all tensors as stored."""
        return sum(self.numel(n) * self.dtype(n).itemsize for n in self._order)

    def get(
        self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Read one tensor.

        Args:
            name: tensor name.
            device: where to put it.
            dtype: cast to this dtype (``None`` keeps the stored one).

        Returns:
            A fresh tensor (writing to it does not touch the file).

        Raises:
            CheckpointError: unknown name, or the file cannot be read; names both.
        """
        if name in self._st:
            f = self._st[name].file
            try:
                if f not in self._handles:
                    self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
                tensor = self._handles[f].get_tensor(name)
            except Exception as exc:  # SafetensorError, OSError
                raise CheckpointError(f"{f}: cannot read tensor {name!r} ({exc})") from exc
        elif name in self._pt:
            tensor = self._pt_tensor(name).clone()
        else:
            raise self._missing(name)
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor.to(device)

    def close(self) -> None:
        """Release the memory maps. The reader can still answer metadata queries."""
        self._handles.clear()
        self._pt_loaded.clear()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self)} tensors)"


def _not_plain_tensors(f: Path) -> CheckpointError:
    """The refusal of a pickle that holds more than tensors.

    torch's own text advises ``weights_only=False``, which would run the file's code;
    shoal never does, so it says what is safe instead.
    """
    return CheckpointError(
        f"{f}: not plain tensors (the pickle holds Python objects, which shoal never "
        "runs); convert it to safetensors"
    )
