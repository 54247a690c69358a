"""Content-addressed models that an algorithm still refers to (``store:<key>`` in recipes).

M2N2's children become parents, so a worker saves a built child under the key of its
recipe and later recipes name it. The runner calls :meth:`ModelStore.retain` after each
batch with the keys the algorithm still needs (what is held only in memory and not named
goes at once); at each checkpoint it calls :meth:`ModelStore.flush` (the retained models
made durable), writes the state, then :meth:`ModelStore.prune` (files the state no longer
names are deleted). Between checkpoints the files of the last saved state stay, so a
killed run resumes from it.

- :class:`MemoryStore` keeps tensors in memory (serial executor) and, given a directory,
  writes the retained entries there at each checkpoint so a killed run can resume.
- :class:`DirStore` keeps one ``<key>.safetensors`` file per model in a directory every
  worker reaches (process pool, Ray).

A stored model lists its tensors in the order they were put (the module's ``state_dict``
order), in memory and read back from disk alike: a ``splitpoint`` merge flattens model A
in A's key order, so the order is part of the model. A ``.safetensors`` file reads back
sorted by name; the file records the order in its metadata (``shoal.order``).
"""

from __future__ import annotations

import abc
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shoal._atomic import atomic_path
from shoal.errors import CheckpointError

__all__ = ["PREFIX", "DirStore", "MemoryStore", "ModelStore", "open_store", "strip_prefix"]

PREFIX = "store:"
Tensors = dict[str, torch.Tensor]


def strip_prefix(ref: str) -> str:
    """``"store:abc"`` -> ``"abc"``; a bare key is returned unchanged."""
    return ref[len(PREFIX) :] if ref.startswith(PREFIX) else ref


def distinct_tensors(tensors: Tensors) -> Tensors:
    """``tensors`` without the names that alias an earlier tensor, in order.

    A tied ``lm_head.weight`` shares the embeddings' storage; ``save_pretrained`` writes
    it once, under the embeddings' name, while ``torch.save`` and ``state_dict()`` list
    both. Sources and stored models pass through here, so every model of a run lists
    the same tensor names whichever way it was saved.
    """
    out: Tensors = {}
    seen: set[tuple[object, ...]] = set()
    for name, t in tensors.items():
        # the address of its first element, its dtype, shape and strides: one view
        ident = (t.device, t.dtype, t.data_ptr(), t.shape, t.stride())
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        out[name] = t
    return out


def _plain(tensors: Tensors) -> Tensors:
    # contiguous CPU copies of the distinct tensors (safetensors refuses shared storage)
    return {
        k: v.detach().to("cpu", copy=True).contiguous()
        for k, v in distinct_tensors(tensors).items()
    }


_ORDER = "shoal.order"


def _save_atomic(path: Path, tensors: Tensors) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_ORDER: json.dumps(list(tensors))})


def _load(path: Path) -> Tensors:
    """A stored model's tensors in the order they were saved (safetensors sorts by name)."""
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        saved = json.loads((f.metadata() or {}).get(_ORDER, "null"))
        if isinstance(saved, list) and sorted(saved) == sorted(names):
            names = saved  # else a file of an older version: its (sorted) file order
        return {name: f.get_tensor(name) for name in names}


class ModelStore(abc.ABC):
    """Key -> state dict (tensor name -> tensor) of a built model."""

    _retained: set[str] | None = None

    @abc.abstractmethod
    def put(self, key: str, tensors: Tensors) -> None:
        """Save a model's tensors under ``key`` (no-op if present: keys name content)."""

    @abc.abstractmethod
    def get(self, key: str) -> Tensors:
        """The tensors stored under ``key`` (``store:`` prefix allowed).

        Raises:
            CheckpointError: If nothing is stored under ``key``.
        """

    @abc.abstractmethod
    def keys(self) -> set[str]:
        """Keys currently held."""

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and strip_prefix(key) in self.keys()

    def retain(self, keys: Iterable[str]) -> None:
        """Mark ``keys`` as still needed; :meth:`prune` drops the others' files.

        No later recipe names a model that is not retained, so what is held only in
        memory may go at once; a file stays until :meth:`prune`, since the last saved
        state may still name it.
        """
        self._retained = {strip_prefix(k) for k in keys}
        self._release()

    def _release(self) -> None:  # noqa: B027 - optional hook
        """Drop in-memory entries that :meth:`retain` did not name."""

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Make the retained entries durable (before the run state refers to them)."""

    def prune(self) -> None:  # noqa: B027 - optional hook
        """Drop every entry not named by the last :meth:`retain` (after the state is saved)."""


class MemoryStore(ModelStore):
    """In-memory store, optionally persisted to ``directory`` at each :meth:`flush`."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self._data: dict[str, Tensors] = {}
        self._retained: set[str] | None = None
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None and self.directory.is_dir():
            for f in self.directory.glob("*.safetensors"):
                self._data[f.stem] = _load(f)

    def put(self, key: str, tensors: Tensors) -> None:
        key = strip_prefix(key)
        if key not in self._data:
            self._data[key] = _plain(tensors)

    def get(self, key: str) -> Tensors:
        try:
            return self._data[strip_prefix(key)]
        except KeyError:
            raise CheckpointError(
                f"model store: no model {key!r} (dropped or never built)"
            ) from None

    def keys(self) -> set[str]:
        return set(self._data)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and strip_prefix(key) in self._data

    def flush(self) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        keep = self._data.keys() if self._retained is None else self._retained & self._data.keys()
        for key in keep:
            path = self.directory / f"{key}.safetensors"
            if not path.exists():
                _save_atomic(path, self._data[key])

    def _release(self) -> None:
        if self._retained is not None:
            for key in [k for k in self._data if k not in self._retained]:
                del self._data[key]

    def prune(self) -> None:
        if self._retained is None:
            return
        if self.directory is not None and self.directory.is_dir():
            for f in self.directory.glob("*.safetensors"):
                if f.stem not in self._retained:
                    f.unlink(missing_ok=True)


class DirStore(ModelStore):
    """One ``<key>.safetensors`` per model in a shared directory, with a small read cache."""

    def __init__(self, directory: str | Path, cache_size: int = 32) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cache: OrderedDict[str, Tensors] = OrderedDict()
        self._cache_size = cache_size
        self._retained: set[str] | None = None

    def _path(self, key: str) -> Path:
        return self.directory / f"{strip_prefix(key)}.safetensors"

    def put(self, key: str, tensors: Tensors) -> None:
        path = self._path(key)
        if not path.exists():
            _save_atomic(path, _plain(tensors))

    def get(self, key: str) -> Tensors:
        key = strip_prefix(key)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        path = self._path(key)
        if not path.is_file():
            raise CheckpointError(f"model store: no model {key!r} in {self.directory}")
        tensors = _load(path)
        self._cache[key] = tensors
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return tensors

    def keys(self) -> set[str]:
        return {f.stem for f in self.directory.glob("*.safetensors")}

    def prune(self) -> None:
        if self._retained is None:
            return
        for f in self.directory.glob("*.safetensors"):
            if f.stem not in self._retained:
                f.unlink(missing_ok=True)

    def _release(self) -> None:
        if self._retained is not None:
            for key in [k for k in self._cache if k not in self._retained]:
                del self._cache[key]


def open_store(spec: Mapping[str, Any]) -> ModelStore:
    """Build a store from ``{"kind": "memory"|"dir", "path": ...}``."""
    kind, path = spec.get("kind", "memory"), spec.get("path")
    if kind == "memory":
        return MemoryStore(str(path) if path else None)
    if kind == "dir":
        if not path:
            raise CheckpointError("model store: kind 'dir' needs a path")
        return DirStore(str(path))
    raise CheckpointError(f"model store: unknown kind {kind!r} (memory, dir)")
