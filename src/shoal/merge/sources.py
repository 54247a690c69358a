"""Where a recipe's models come from: checkpoints on disk or state dicts in memory.

A *source* is anything with the read side of
:class:`~shoal.checkpoint.CheckpointReader`: ``keys()``, ``in``, ``shape(name)``,
``dtype(name)``, ``get(name, device=...)``, ``path`` and ``config``. A plain mapping of
names to tensors is wrapped in :class:`DictSource`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from shoal.checkpoint import open_checkpoint
from shoal.errors import CheckpointError
from shoal.recipe import Recipe


@runtime_checkable
class TensorSource(Protocol):
    """The read interface the merge needs (a :class:`~shoal.checkpoint.CheckpointReader`)."""

    path: Any
    config: dict[str, Any] | None

    def keys(self) -> list[str]:
        """Tensor names in order."""
        ...

    def __contains__(self, name: object) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor (no data read)."""
        ...

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of one tensor (no data read)."""
        ...

    def get(
        self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Read one tensor."""
        ...


class DictSource:
    """A state dict in memory seen as a source (no copies are made).

    Args:
        tensors: name → tensor, in the order the model defines them.
        label: how messages name this model (its recipe reference).
        config: the model's ``config.json`` content, if known.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        label: str,
        config: dict[str, Any] | None = None,
    ) -> None:
        self._tensors = tensors
        self.path = label
        self.config = config

    def keys(self) -> list[str]:
        """Tensor names in mapping order."""
        return list(self._tensors.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def _tensor(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor."""
        return tuple(self._tensor(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of one tensor."""
        return self._tensor(name).dtype

    def get(
        self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The tensor itself, detached, moved or cast only when asked."""
        tensor = self._tensor(name).detach()
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor.to(device)

    def close(self) -> None:
        """Nothing to release."""


def resolve_model_path(ref: str, recipe: Recipe) -> Path:
    """The local path a model reference names.

    Absolute paths are used as they are; a relative one is looked up in the current
    directory first, then next to the recipe file. shoal never downloads models.

    Raises:
        CheckpointError: the path exists in neither place.
    """
    path = Path(ref).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path.cwd() / path]
        if recipe.source_dir is not None and recipe.source_dir != Path.cwd():
            candidates.append(recipe.source_dir / path)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise CheckpointError(
        f"{ref}: model not found (looked in {looked}); shoal reads local checkpoints only"
    )


def _as_source(value: Any, ref: str) -> TensorSource:
    if isinstance(value, TensorSource):
        return value
    if isinstance(value, Mapping):
        return DictSource(value, ref)
    if isinstance(value, torch.nn.Module):
        return DictSource(value.state_dict(), ref)
    raise TypeError(f"source for {ref!r} must be a mapping of tensors or a reader, got {value!r}")


def open_sources(
    recipe: Recipe, given: Mapping[str, Any] | None = None
) -> tuple[dict[str, TensorSource], list[TensorSource]]:
    """One source per model reference of the recipe.

    Args:
        recipe: the recipe.
        given: sources supplied by the caller, keyed by the model string of the recipe
            (state dicts, modules or readers); the others are opened from disk.

    Returns:
        ``(sources by reference, the readers opened here)`` — close the latter when done.
        When the recipe mixes a vision-language model with a causal LM, the VLM's source
        is its :class:`~shoal.merge.vlm.LanguageView` (``docs/vlm.md``).
    """
    given = given or {}
    sources: dict[str, TensorSource] = {}
    opened: list[TensorSource] = []
    try:
        for ref in recipe.model_refs():
            if ref in given:
                sources[ref] = _as_source(given[ref], ref)
                continue
            reader = open_checkpoint(resolve_model_path(ref, recipe))
            sources[ref] = reader
            opened.append(reader)
        # a vision-language model beside a causal LM is seen through its language part
        from shoal.merge.vlm import language_views

        language_views(sources, recipe.model_refs())
    except BaseException:
        close_all(opened)
        raise
    return sources, opened


def close_all(readers: list[TensorSource]) -> None:
    """Close readers opened by :func:`open_sources`."""
    for reader in readers:
        close = getattr(reader, "close", None)
        if close is not None:
            close()
