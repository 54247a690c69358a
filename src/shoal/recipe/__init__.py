"""shoal.recipe — what to build: the merge recipe schema.

A recipe is a small, serialisable description of one model built from existing
ones. shoal reads the YAML mergekit users already write (``models:`` or
``slices:``, ``merge_method``, ``base_model``, ``parameters`` at global, model and
slice scope, ``dtype``/``out_dtype``, ``tokenizer_source`` or ``tokenizer:``), validates it strictly
(unknown keys, bad types and out-of-range values are :class:`~shoal.errors.RecipeError`
naming the file and key), and hashes it canonically so a merged model can be named
by content.

- :func:`load_recipe` — YAML file, YAML text or dict → :class:`Recipe`
- :data:`METHODS` — the registry of merge methods and their parameters
- :func:`resolve` — a parameter's value for one tensor at one layer (gradients, filters)

Executing a recipe lives one layer up, in :mod:`shoal.merge`. Names are imported
lazily (pydantic is only loaded when a recipe is), so ``shoal --help`` can read
:data:`METHODS` cheaply.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# public name -> defining module
_LAZY = {
    "DTYPES": "shoal.recipe.schema",
    "METHODS": "shoal.recipe.methods",
    "MethodSpec": "shoal.recipe.methods",
    "ModelEntry": "shoal.recipe.schema",
    "ParamSpec": "shoal.recipe.methods",
    "Recipe": "shoal.recipe.schema",
    "Slice": "shoal.recipe.schema",
    "SliceSource": "shoal.recipe.schema",
    "canonical_dtype": "shoal.recipe.schema",
    "evaluate": "shoal.recipe.params",
    "interpolate": "shoal.recipe.params",
    "is_pre_tensor": "shoal.recipe.params",
    "load_recipe": "shoal.recipe.load",
    "method_spec": "shoal.recipe.methods",
    "parse_yaml": "shoal.recipe.load",
    "position": "shoal.recipe.params",
    "rename_models": "shoal.recipe.schema",
    "resolve": "shoal.recipe.params",
}

__all__ = [
    "DTYPES",
    "METHODS",
    "MethodSpec",
    "ModelEntry",
    "ParamSpec",
    "Recipe",
    "Slice",
    "SliceSource",
    "canonical_dtype",
    "evaluate",
    "interpolate",
    "is_pre_tensor",
    "load_recipe",
    "method_spec",
    "parse_yaml",
    "position",
    "rename_models",
    "resolve",
]

if TYPE_CHECKING:  # pragma: no cover
    from shoal.recipe.load import load_recipe, parse_yaml
    from shoal.recipe.methods import METHODS, MethodSpec, ParamSpec, method_spec
    from shoal.recipe.params import evaluate, interpolate, is_pre_tensor, position, resolve
    from shoal.recipe.schema import (
        DTYPES,
        ModelEntry,
        Recipe,
        Slice,
        SliceSource,
        canonical_dtype,
        rename_models,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shoal.recipe' has no attribute {name!r}")
