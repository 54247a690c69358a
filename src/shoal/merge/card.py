"""The model card (README.md) written next to a merged checkpoint."""

from __future__ import annotations

from shoal.recipe import METHODS, Recipe


def rebuild_command(seed: int, *, float32_compute: bool = False) -> str:
    """The command that rebuilds a merge from its stored ``shoal_recipe.yaml``.

    The seed is part of it because DARE's random drops depend on it, and
    ``--float32-compute`` when the merge computed in float32 against its recipe's dtype.
    """
    extra = " --float32-compute" if float32_compute else ""
    return f"shoal merge shoal_recipe.yaml OUT --seed {seed}{extra}"


def rebuild_line(seed: int, *, float32_compute: bool = False) -> str:
    """First line of a stored ``shoal_recipe.yaml``: :func:`rebuild_command` as a comment."""
    return f"# rebuild: {rebuild_command(seed, float32_compute=float32_compute)}"


def model_card(
    recipe: Recipe, *, seed: int, num_tensors: int, version: str, float32_compute: bool = False
) -> str:
    """Markdown describing how the model was made: method, sources, recipe, shoal version.

    Args:
        recipe: the recipe that was executed.
        seed: the run seed.
        num_tensors: how many tensors were written.
        version: the shoal version.
        float32_compute: the merge computed in float32 (``--float32-compute``).

    Returns:
        The README text.
    """
    spec = METHODS[recipe.merge_method]
    command = rebuild_command(seed, float32_compute=float32_compute)
    sources = "\n".join(f"- `{ref}`" for ref in recipe.model_refs())
    base = f"`{recipe.base_model}`" if recipe.base_model else "none"
    return (
        "---\ntags:\n- shoal\n- merge\n---\n\n"
        f"# Merged model ({recipe.merge_method})\n\n"
        f"Built with shoal {version} by `shoal merge`, without training.\n\n"
        f"- method: **{recipe.merge_method}** — {spec.help}\n"
        f"- base model: {base}\n"
        f"- tensors: {num_tensors}\n"
        f"- seed: {seed}\n"
        f"- recipe sha256: `{recipe.content_hash()}`\n\n"
        f"## Source models\n\n{sources}\n\n"
        "## Recipe\n\n"
        "The same recipe is stored as `shoal_recipe.yaml`; "
        f"`{command}` rebuilds the model from any directory (the "
        "stored copy names every model by its absolute path) while the models stay "
        "where they were.\n\n"
        f"```yaml\n{recipe.to_yaml()}```\n"
    )
