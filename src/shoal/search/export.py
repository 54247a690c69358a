"""Writing the best candidate as a loadable checkpoint (``best/`` of a run folder).

The best recipe is rebuilt by a worker (from the store when the algorithm kept its models,
so the exported weights are exactly the ones scored) and written to a temporary sibling
directory renamed into place: a Hugging Face directory (``save_pretrained`` + tokenizer) for
transformers models, H4b's layer-path exporter for ``layer_path`` recipes, and
``model.safetensors`` of the state dict for any other torch module. ``shoal_recipe.yaml``
beside the weights records the recipe and seed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from shoal._atomic import replace_dir, temp_sibling

__all__ = ["export_model"]


def export_model(
    model: torch.nn.Module,
    recipe: dict[str, Any],
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    seed: int | None = None,
) -> Path:
    """Write ``model`` (built from ``recipe``) to ``out_dir`` atomically.

    Args:
        model: The built model.
        recipe: Its recipe (recorded in ``shoal_recipe.yaml``).
        out_dir: Target directory (replaced if present).
        tokenizer: Saved beside a transformers model when given.
        seed: The candidate seed (recorded).

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
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
        meta = {"recipe": recipe, "seed": seed}
        (tmp / "shoal_recipe.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
