"""The recipe schema: a pydantic v2 model of the mergekit YAML people already write.

Either ``models:`` (each ``model`` with optional ``parameters``) or ``slices:`` (each
with ``sources`` of ``model`` + ``layer_range`` + optional ``parameters``), plus
``merge_method``, ``base_model``, global ``parameters``, ``dtype``, ``out_dtype``,
``tokenizer_source`` or the ``tokenizer:`` block, and ``chat_template``. Unknown keys
are errors everywhere.
Parameter values are checked against the method in :mod:`shoal.recipe.params`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from shoal._yaml import safe_dump

DTYPES = ("float32", "float16", "bfloat16", "float64")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    """One entry of ``models:``."""

    model: str = Field(min_length=1, description="path of a local checkpoint (directory or file)")
    parameters: dict[str, Any] | None = Field(
        default=None, description="per-model parameters (weight, density, ...)"
    )


class SliceSource(_Strict):
    """One source of a slice: a layer range of one model."""

    model: str = Field(min_length=1, description="path of a local checkpoint")
    layer_range: tuple[int, int] = Field(description="[start, end) of the layers taken")
    parameters: dict[str, Any] | None = Field(default=None, description="per-source parameters")


class Slice(_Strict):
    """One output slice: layers built from its sources' layer ranges."""

    sources: list[SliceSource] = Field(min_length=1, description="the layer ranges merged")
    parameters: dict[str, Any] | None = Field(default=None, description="slice parameters")


class TokenEntry(_Strict):
    """One entry of ``tokenizer.tokens``: where the rows of one output token come from.

    ``source`` is a model of the recipe, ``{kind: zero}`` (``zero`` for short), or
    ``{kind: model_token, model: M, token: T}`` / ``token_id: N`` (row ``T``/``N`` of
    model ``M``'s own vocabulary), as in mergekit. Checked in :mod:`shoal.recipe.load`.
    """

    source: str | dict[str, Any] | None = Field(
        default=None, description="a model path, zero, or {kind: model_token, ...}"
    )
    force: bool = Field(default=False, description="use source even for models that have the token")


class TokenizerBlock(_Strict):
    """mergekit's ``tokenizer:`` block: output vocabulary and per-token rows."""

    source: str | None = Field(
        default=None,
        description="'union' (mergekit's default: every model's tokens), 'base' or a model path",
    )
    tokens: dict[str, TokenEntry] | None = Field(
        default=None, description="token → where its embedding rows come from (added if new)"
    )
    pad_to_multiple_of: int | None = Field(
        default=None, ge=1, description="pad the vocabulary rows to a multiple of this"
    )


class Recipe(_Strict):
    """How to build one model from existing ones (see ``docs/merging.md``)."""

    merge_method: str = Field(description="a name from shoal.recipe.METHODS")
    models: list[ModelEntry] | None = Field(default=None, description="models merged whole")
    slices: list[Slice] | None = Field(
        default=None, min_length=1, description="output slices (layer ranges)"
    )
    base_model: str | None = Field(
        default=None, min_length=1, description="common ancestor / t=0 model"
    )
    parameters: dict[str, Any] | None = Field(default=None, description="global parameters")
    dtype: str | None = Field(default=None, description="dtype of the output tensors")
    out_dtype: str | None = Field(default=None, description="output dtype (overrides dtype)")
    tokenizer_source: str | None = Field(
        default=None,
        description="'union', 'base' or a model path: where the output vocabulary comes from",
    )
    tokenizer: TokenizerBlock | None = Field(
        default=None, description="output vocabulary: source, tokens, pad_to_multiple_of"
    )
    chat_template: str | None = Field(default=None, description="chat template for the output")
    components: list[str] | None = Field(
        default=None,
        min_length=1,
        description="diffusers pipelines: the components merged (default: unet); the others "
        "are copied from the base",
    )

    _source_dir: Path | None = PrivateAttr(default=None)

    @property
    def source_dir(self) -> Path | None:
        """Directory of the YAML file the recipe was read from (resolves relative paths)."""
        return self._source_dir

    def with_source_dir(self, path: Path | None) -> Recipe:
        """Return the recipe remembering ``path`` as the directory of its file."""
        self._source_dir = path
        return self

    def __eq__(self, other: object) -> bool:
        """Recipes are equal when they describe the same merge (file location aside)."""
        if not isinstance(other, Recipe):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable containers inside

    def to_dict(self) -> dict[str, Any]:
        """Plain data (only keys that are set), as YAML/JSON would hold it."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        """The recipe as YAML, keys in schema order."""
        return safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def content_hash(self) -> str:
        """sha256 of the canonical JSON of :meth:`to_dict` (sorted keys, no spaces)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def model_refs(self) -> list[str]:
        """Every model string the recipe names, base first, each once, in order."""
        refs: list[str] = []
        candidates = [self.base_model] if self.base_model else []
        candidates += [m.model for m in self.models or []]
        candidates += [s.model for sl in self.slices or [] for s in sl.sources]
        tok = self.vocabulary_source()
        if tok not in (None, "base", "union"):
            candidates.append(str(tok))
        for ref in candidates:
            if ref and ref not in refs:
                refs.append(ref)
        return refs

    def vocabulary_source(self) -> str | None:
        """Where the output vocabulary comes from: ``tokenizer_source`` or
        ``tokenizer.source``; a ``tokenizer:`` block without a source means ``union``
        (mergekit's default); ``None`` when the recipe names neither."""
        if self.tokenizer is not None:
            return self.tokenizer.source or "union"
        return self.tokenizer_source

    def output_dtype(self) -> str | None:
        """``out_dtype`` if set, else ``dtype``, else ``None`` (keep the source dtype)."""
        return self.out_dtype or self.dtype


def rename_models(data: dict[str, Any], rename: Mapping[str, str]) -> dict[str, Any]:
    """A copy of a recipe's plain data with every model string in ``rename`` replaced.

    Works on data as :meth:`Recipe.to_dict` gives it (or a run's candidate recipe, which
    may hold more keys): ``base_model``, ``models[].model``, ``slices[].sources[].model``
    a ``tokenizer_source`` or ``tokenizer.source`` other than ``base``, and the models
    ``tokenizer.tokens`` entries take rows from.
    """

    def new(ref: Any) -> Any:
        return rename.get(ref, ref) if isinstance(ref, str) else ref

    out = copy.deepcopy(data)
    if "base_model" in out:
        out["base_model"] = new(out["base_model"])
    for entry in out.get("models") or []:
        entry["model"] = new(entry.get("model"))
    for piece in out.get("slices") or []:
        for source in piece.get("sources") or []:
            source["model"] = new(source.get("model"))
    if out.get("tokenizer_source") not in (None, "base", "union"):
        out["tokenizer_source"] = new(out["tokenizer_source"])
    block = out.get("tokenizer")
    if isinstance(block, dict):
        if block.get("source") not in (None, "base", "union"):
            block["source"] = new(block["source"])
        for entry in (block.get("tokens") or {}).values():
            if not isinstance(entry, dict):
                continue
            source = entry.get("source")
            if isinstance(source, dict) and "model" in source:
                source["model"] = new(source["model"])
            elif source != "zero":
                entry["source"] = new(source)
    return out


def canonical_dtype(name: str) -> str | None:
    """Map a dtype spelling (``bf16``, ``torch.float16``) to one of ``DTYPES``."""
    key = name.strip().lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    return key if key in DTYPES else None
