"""Merging in memory: a new state dict, or in place into live tensors (the search loop).

``merge_into`` writes each merged tensor into an existing tensor with ``copy_``, so a
search that evaluates many candidates keeps one model and allocates nothing per
candidate beyond one tensor's worth of scratch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from shoal.errors import MergeError
from shoal.merge.execute import iter_merged
from shoal.merge.plan import build_plan
from shoal.merge.sources import close_all, open_sources
from shoal.merge.vocab import recipe_vocabulary
from shoal.recipe import Recipe, load_recipe

RecipeLike = Recipe | str | Path | Mapping[str, Any]


def merge_state_dicts(
    recipe: RecipeLike,
    sources: Mapping[str, Any] | None = None,
    *,
    device: str = "cpu",
    seed: int = 0,
    dtype: str | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, torch.Tensor]:
    """Execute a recipe in memory and return the merged state dict.

    Args:
        recipe: a :class:`~shoal.recipe.Recipe`, YAML path/text or dict.
        sources: model reference (the string in the recipe) → state dict, module or
            :class:`~shoal.checkpoint.CheckpointReader`; references not given are opened
            from disk.
        device: where to compute and put the result.
        seed: seed of the random drops (DARE).
        dtype: output dtype (default: the recipe's, else the sources').
        allow_nonfinite: accept NaN/Inf in the inputs.

    Returns:
        ``{name: tensor}`` in output order. With a tokenizer source, the embedding and
        head tensors have one row per output token, as :func:`merge_to_disk` writes them (the
        tokenizers are read from the models' directories).

    Example:
        >>> sd = merge_state_dicts(recipe, {"a": model_a.state_dict(), "b": sd_b})  # doctest: +SKIP
    """
    recipe = load_recipe(recipe)
    srcs, opened = open_sources(recipe, sources)
    try:
        plan = build_plan(recipe, srcs, dtype=dtype, vocab=recipe_vocabulary(recipe, srcs))
        return dict(
            iter_merged(plan, srcs, device=device, seed=seed, allow_nonfinite=allow_nonfinite)
        )
    finally:
        close_all(opened)


def merge_into(
    target: Mapping[str, torch.Tensor],
    recipe: RecipeLike,
    sources: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    device: str | None = None,
    allow_nonfinite: bool = False,
) -> None:
    """Execute a recipe, writing every merged tensor into ``target`` in place.

    Args:
        target: name → existing tensor (e.g. ``module.state_dict(keep_vars=True)`` or a
            dict of parameters); each merged tensor is ``copy_``-ed into it (cast to its
            dtype and device).
        recipe: the recipe.
        sources: as in :func:`merge_state_dicts`.
        seed: seed of the random drops.
        device: where to compute; default: the device of the first target tensor.
        allow_nonfinite: accept NaN/Inf in the inputs.

    Raises:
        MergeError: a merged tensor has no counterpart in ``target`` or another shape;
            checked for all tensors before anything is written.

    The target's shapes are fixed, so a tokenizer source does not realign vocabularies
    here: models with different vocabularies end in the shape error.
    """
    recipe = load_recipe(recipe)
    if device is None:
        first = next(iter(target.values()), None)
        device = str(first.device) if first is not None else "cpu"
    srcs, opened = open_sources(recipe, sources)
    try:
        plan = build_plan(recipe, srcs)
        for tp in plan.tensors:
            if tp.name not in target:
                raise MergeError(f"tensor {tp.name!r} of the merge has no place in the target")
            if tuple(target[tp.name].shape) != tp.shape:
                raise MergeError(
                    f"tensor {tp.name!r}: merged shape {list(tp.shape)} differs from the "
                    f"target's {list(target[tp.name].shape)}"
                )
        with torch.no_grad():
            for name, tensor in iter_merged(
                plan, srcs, device=device, seed=seed, allow_nonfinite=allow_nonfinite
            ):
                target[name].copy_(tensor)
    finally:
        close_all(opened)


def merge_into_module(
    module: torch.nn.Module,
    recipe: RecipeLike,
    sources: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    allow_nonfinite: bool = False,
) -> None:
    """:func:`merge_into` the parameters and buffers of a live module.

    Tied weights (e.g. ``lm_head.weight`` sharing ``embed_tokens.weight``) are the
    same tensor and receive the value of whichever name is merged last.
    """
    merge_into(
        module.state_dict(keep_vars=True),
        recipe,
        sources,
        seed=seed,
        allow_nonfinite=allow_nonfinite,
    )
