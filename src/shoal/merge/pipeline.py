"""Merging diffusers pipeline folders component by component.

A diffusers pipeline is a folder with ``model_index.json`` and one subfolder per
component (``unet/``, ``text_encoder/``, ``vae/``, ``scheduler/``, ...). A recipe whose
models are such folders merges the components it names in ``components:`` (by default
the U-Net) with the ordinary engine, each as its own checkpoint (``<model>/<component>``),
and copies every other file of the base (``base_model``, else the first model) byte for
byte. A merged diffusers model keeps diffusers' file name
(``diffusion_pytorch_model.safetensors``, or its index when sharded), so the output loads
with ``DiffusionPipeline.from_pretrained``. Everything is written into a temporary
sibling of the output and renamed at the end.

Everything a user can get wrong is checked before anything is written: a model that is
not a pipeline folder, a component that one of them lacks or holds no weights for, merged
components whose ``config.json`` differ (other than diffusers' bookkeeping keys starting
with ``_``), an output inside one of the pipelines.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shoal._atomic import (
    atomic_dir,
    hold_lock,
    refuse_output_holding,
    refuse_working_dir,
    remove_stale_temp_siblings,
)
from shoal.checkpoint import first_mismatch, tensor_shapes
from shoal.errors import CheckpointError, OutputExistsError, RecipeError
from shoal.recipe import Recipe, rename_models

__all__ = [
    "DEFAULT_COMPONENTS",
    "PIPELINE_INDEX",
    "check_pipelines",
    "install_component",
    "is_pipeline",
    "merge_pipeline",
    "pipeline_components",
    "pipeline_paths",
    "rename_weights",
    "uses_diffusers_names",
]

PIPELINE_INDEX = "model_index.json"
#: what a pipeline recipe merges when it names no components
DEFAULT_COMPONENTS = ("unet",)
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"


def is_pipeline(path: str | Path) -> bool:
    """Whether ``path`` is a diffusers pipeline folder (holds ``model_index.json``)."""
    return (Path(path) / PIPELINE_INDEX).is_file()


def pipeline_components(path: str | Path) -> dict[str, list[Any]]:
    """The components ``model_index.json`` lists: name → ``[library, class]``.

    Raises:
        RecipeError: the file is not a JSON object.
    """
    data = _read_json(Path(path) / PIPELINE_INDEX, "a readable model index")
    return {
        k: v
        for k, v in data.items()
        if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None
    }


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """A component's config without the bookkeeping keys (``_name_or_path``, versions)."""
    skip = {"torch_dtype", "dtype", "transformers_version"}
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in skip}


def _read_json(path: Path, what: str = "readable JSON") -> dict[str, Any]:
    """The JSON object in ``path``; :class:`RecipeError` ``{path}: not {what} (…)`` else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{path}: not {what} ({exc})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a JSON object")
    return data


def _config_difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """The first key on which two configs differ, as ``key: A vs B``."""
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key)!r} vs {b.get(key)!r}"
    return ""


def check_pipelines(paths: Mapping[str, Path], reference: str, components: Sequence[str]) -> None:
    """Refuse pipelines that cannot be merged on ``components``, naming the model and key.

    Args:
        paths: model reference → its folder.
        reference: the reference (the base, else the first model) whose files are copied.
        components: the components to merge.

    Raises:
        RecipeError: a model is not a pipeline folder, lacks a component, or holds a
            component whose config differs from the reference's.
    """
    ref_dir = paths[reference]
    if not is_pipeline(ref_dir):
        raise RecipeError(
            f"components: merging components needs diffusers pipeline folders, and "
            f"{reference} ({ref_dir}) has no {PIPELINE_INDEX}"
        )
    listed = pipeline_components(ref_dir)
    for ref, path in paths.items():
        if not is_pipeline(path):
            raise RecipeError(
                f"{ref}: not a diffusers pipeline folder (no {PIPELINE_INDEX} in {path}), "
                f"while {reference} is one"
            )
    seen: set[str] = set()
    for comp in components:
        if comp in seen:
            raise RecipeError(f"components: {comp!r} is named twice")
        seen.add(comp)
        if comp not in listed:
            known = ", ".join(sorted(listed)) or "none"
            raise RecipeError(
                f"components: {comp!r} is not a component of the pipeline {ref_dir} "
                f"(its components: {known})"
            )
        ref_cfg_path = ref_dir / comp / "config.json"
        ref_cfg = _comparable(_read_json(ref_cfg_path)) if ref_cfg_path.is_file() else None
        for ref, path in paths.items():
            folder = path / comp
            if not folder.is_dir():
                raise RecipeError(f"components.{comp}: {ref} has no {comp}/ folder ({path})")
            _tensor_shapes(folder, f"components.{comp}")  # weights there, before any work
            if ref_cfg is None:
                continue
            cfg_path = folder / "config.json"
            if not cfg_path.is_file():
                raise RecipeError(f"components.{comp}: {cfg_path} is missing")
            diff = _config_difference(ref_cfg, _comparable(_read_json(cfg_path)))
            if diff:
                raise RecipeError(
                    f"components.{comp}: {cfg_path} differs from {reference}'s config ({diff})"
                )


def uses_diffusers_names(folder: Path) -> bool:
    """Whether a model folder names its weights as diffusers does (safetensors or .bin,
    single or sharded); a merge of it is then written under diffusers' name."""
    return any(folder.glob(f"{_DIFFUSERS_WEIGHTS}*"))


def _tensor_shapes(folder: Path, where: str) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of the model in ``folder``, from its headers.

    Raises:
        RecipeError: no readable weights there (``where`` names the key).
    """
    try:
        return tensor_shapes(folder)
    except CheckpointError as exc:
        raise RecipeError(f"{where}: {exc}") from None


def _refuse_inside(out: Path, folders: Mapping[str, Path]) -> None:
    """An output that is, or lies inside, one of the input folders would be copied into
    itself (or replace an input): refuse it before anything is written."""
    target = out.resolve()
    for ref, path in folders.items():
        src = path.resolve()
        if target == src or src in target.parents:
            raise OutputExistsError(f"{out}: inside the model {ref!r} ({path}); write elsewhere")


def _ignore_at_top(root: Path, names: Sequence[str]) -> Any:
    """A ``shutil.copytree`` ignore that skips ``names`` in ``root`` itself only (a nested
    file that happens to share a component's name is copied)."""
    top = os.path.abspath(root)

    def ignore(directory: str, entries: list[str]) -> list[str]:
        return [e for e in entries if e in names] if os.path.abspath(directory) == top else []

    return ignore


def rename_weights(folder: Path) -> None:
    """shoal's writer names weights ``model*.safetensors``; diffusers models look for
    ``diffusion_pytorch_model.safetensors`` (or its ``.index.json``)."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        os.replace(single, folder / f"{_DIFFUSERS_WEIGHTS}.safetensors")
    if index.is_file():
        os.replace(index, folder / f"{_DIFFUSERS_WEIGHTS}.safetensors.index.json")


def install_component(
    pipeline: str | Path,
    component: str,
    weights_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a copy of ``pipeline`` whose ``component`` comes from ``weights_dir``.

    For putting a model that ``shoal evolve`` wrote (its ``best/``, a U-Net checkpoint)
    back into a pipeline: every other file of ``pipeline`` is copied byte for byte;
    ``weights_dir``'s safetensors and ``config.json`` replace the component's.

    Raises:
        RecipeError: ``pipeline`` is not a pipeline or lacks ``component``; ``weights_dir``
            holds no safetensors, or tensors whose names or shapes are not the component's.
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false (with it, the old
            folder is replaced only once the new one is complete), or lies inside
            ``pipeline`` or ``weights_dir``.
    """
    src, out = Path(pipeline), Path(out_dir)
    weights = Path(weights_dir)
    if not is_pipeline(src) or component not in pipeline_components(src):
        raise RecipeError(f"{src}: not a diffusers pipeline with a {component!r} component")
    if not any(weights.glob("*.safetensors")):
        raise RecipeError(f"{weights}: no safetensors weights to install as {component}")
    _check_fits(
        _tensor_shapes(src / component, component),
        _tensor_shapes(weights, "weights"),
        f"{weights} as {src / component}",
    )
    refuse_working_dir(out)
    _refuse_inside(out, {"pipeline": src, "weights": weights})
    refuse_output_holding(out, {f"the pipeline {src}": src, f"the weights {weights}": weights})
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: exists; remove it or write elsewhere")
    with atomic_dir(out) as tmp:
        shutil.copytree(src, tmp, ignore=_ignore_at_top(src, [component]))
        dest = tmp / component
        dest.mkdir()
        for f in weights.iterdir():
            if f.is_file() and (f.suffix == ".safetensors" or f.name.endswith(".index.json")):
                shutil.copy2(f, dest / f.name)
        shutil.copy2(src / component / "config.json", dest / "config.json")
        if uses_diffusers_names(src / component):
            rename_weights(dest)
    return out


def _check_fits(
    want: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]], what: str
) -> None:
    """The same tensor names with the same shapes, or one line naming the first that differs."""
    found = first_mismatch(want, got)
    if found is None:
        return
    name, how = found
    if how == "missing":
        raise RecipeError(f"{what}: tensor {name} is missing")
    if how == "shape":
        raise RecipeError(
            f"{what}: tensor {name} has shape {list(got[name])}, the component's {list(want[name])}"
        )
    raise RecipeError(f"{what}: tensor {name} is not the component's")


def pipeline_paths(recipe: Recipe) -> dict[str, Path] | None:
    """Every model of ``recipe`` → its folder when the recipe merges pipelines (its
    reference is a pipeline folder, or it names ``components``), else ``None``."""
    from shoal.merge.sources import resolve_model_path

    refs = recipe.model_refs()
    if not refs:
        return None
    reference = recipe.base_model or refs[0]
    ref_path = resolve_model_path(reference, recipe)
    if recipe.components is None and not is_pipeline(ref_path):
        return None
    return {ref: resolve_model_path(ref, recipe) for ref in refs}


def merge_pipeline(
    recipe: Recipe,
    paths: Mapping[str, Path],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    **merge_options: Any,
) -> Path:
    """Merge the named components of diffusers pipelines; copy the rest from the base.

    Args:
        recipe: a validated recipe whose models are pipeline folders.
        paths: every model reference of the recipe → its folder.
        out_dir: the pipeline folder to create.
        overwrite: replace ``out_dir`` if it exists.
        merge_options: passed on to :func:`~shoal.merge.to_disk.merge_to_disk` for each
            component (device, dtype, seed, progress, ...).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ShoalError: a mistake in the recipe or the pipelines (checked before anything is
            written), or any error of the component merges; ``out_dir`` is then as it was.
    """
    from shoal._yaml import safe_dump
    from shoal.merge.to_disk import merge_to_disk

    refs = recipe.model_refs()
    reference = recipe.base_model or refs[0]
    components = list(recipe.components or DEFAULT_COMPONENTS)
    check_pipelines(paths, reference, components)
    out = Path(out_dir)
    refuse_working_dir(out)
    _refuse_inside(out, paths)
    refuse_output_holding(out, {f"the recipe's model {ref!r}": p for ref, p in paths.items()})
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: exists (pass --overwrite to replace it)")
    target = Path(os.path.abspath(out))
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_siblings(target)
    data = recipe.to_dict()
    data.pop("components", None)
    ref_dir = paths[reference]
    lock = target.with_name(f".{target.name}.lock")
    with hold_lock(lock, str(out), remove=True), atomic_dir(target) as tmp:
        shutil.copytree(ref_dir, tmp, ignore=_ignore_at_top(ref_dir, components))
        for comp in components:
            sub = rename_models(data, {ref: str((p / comp).resolve()) for ref, p in paths.items()})
            merge_to_disk(sub, tmp / comp, **merge_options)  # keeps diffusers' file names
        stored = rename_models(recipe.to_dict(), {r: str(p.resolve()) for r, p in paths.items()})
        (tmp / "shoal_recipe.yaml").write_text(
            safe_dump(stored, sort_keys=False, default_flow_style=None), encoding="utf-8"
        )
    return out
