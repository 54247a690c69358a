"""Writing the best candidate as a loadable checkpoint (``best/`` of a run folder).

The best recipe is rebuilt by a worker (from the store when the algorithm kept its models,
so the exported weights are exactly the ones scored) and written to a temporary sibling
directory renamed into place: a Hugging Face directory (``save_pretrained`` + tokenizer) for
transformers models, H4b's layer-path exporter for ``layer_path`` recipes, and
``model.safetensors`` of the state dict for any other torch module. ``shoal_recipe.yaml``
beside the weights is the recipe with the run's model names replaced by their paths, its
first line the ``shoal merge`` command (with the candidate's seed) that rebuilds the model.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from shoal._atomic import atomic_dir
from shoal._yaml import safe_dump

__all__ = ["export_model", "stored_recipe"]


def stored_recipe(recipe: dict[str, Any], seed: int | None, models: Mapping[str, str]) -> str:
    """``shoal_recipe.yaml`` of a run's best: a recipe ``shoal merge`` reads on its own.

    Model names become the paths the run used; the first line is the command that
    rebuilds the model with the candidate's seed (DARE's drops depend on it). What
    ``shoal merge`` cannot build says so in its first line instead: a source model
    itself, a layer path (``shoal.load_model`` loads the folder; its ``path`` keeps the
    names, listed below the line), a parent from the run's store (``store:<key>``),
    a random draw or a mutated child (M2N2).
    """
    from shoal.merge.card import rebuild_line
    from shoal.recipe import METHODS, rename_models

    def path(ref: Any) -> Any:
        return models.get(ref, ref) if isinstance(ref, str) else ref

    out = copy.deepcopy(recipe)
    method = out.get("merge_method")
    if method == "layer_path":
        lines = ["# a layer path: load this folder with shoal.load_model (not shoal merge)"]
        lines += [f"#   {name}: {where}" for name, where in models.items()]
        return "\n".join(lines) + "\n" + safe_dump(out, sort_keys=False)
    if method is None and "model" in out:
        out["model"] = path(out["model"])
        return f"# a source model itself: {out['model']}\n" + safe_dump(out)
    out = rename_models(out, models)
    mutation = out.get("svd_mutation")
    if isinstance(mutation, dict):  # CycleQD: the expert whose task vector's SVD steps
        out["svd_mutation"] = {
            k: path(v) if k in ("expert", "base") else v for k, v in mutation.items()
        }
    if "store:" in json.dumps(out):
        why = "a parent (store:<key>) is a model of the run's store"
    elif method not in METHODS or "mutation" in out:
        why = "it is a random draw or a mutated child"
    else:
        why = ""
    first = (
        f"# shoal merge cannot rebuild this: {why}; the run built it (seed {seed or 0})"
        if why
        else rebuild_line(seed or 0)
    )
    return first + "\n" + safe_dump(out, sort_keys=False)


def export_model(
    model: torch.nn.Module,
    recipe: dict[str, Any],
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    seed: int | None = None,
    models: Mapping[str, str] | None = None,
    card: str | None = None,
) -> Path:
    """Write ``model`` (built from ``recipe``) to ``out_dir`` atomically.

    Args:
        model: The built model.
        recipe: Its recipe (recorded in ``shoal_recipe.yaml``).
        out_dir: Target directory (replaced if present).
        tokenizer: Saved beside a transformers model when given.
        seed: The candidate seed (recorded).
        models: The run's model names -> paths, written into the stored recipe.
        card: A model card, written as ``README.md`` in the same atomic write.

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        if recipe.get("merge_method") == "layer_path":
            from shoal.merge.layer_path import export_layer_path

            export_layer_path(model, tmp, overwrite=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        elif hasattr(model, "save_pretrained"):
            save: Any = model.save_pretrained
            save(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        else:
            tmp.mkdir()
            state = {
                k: v.detach().to("cpu", copy=True).contiguous()
                for k, v in model.state_dict().items()
            }
            save_file(state, str(tmp / "model.safetensors"))
        (tmp / "shoal_recipe.yaml").write_text(stored_recipe(recipe, seed, models or {}))
        if card is not None:
            (tmp / "README.md").write_text(card)
    return out
