"""Multi-stage recipes (mergekit-multi): several YAML documents, each a stage with a ``name``.

A later stage names an earlier one as a model by that name. ``shoal merge multi.yml OUT``
checks every stage first, runs them in dependency order, writes each intermediate into
the work folder ``.<OUT name>.stages/<stage name>`` beside OUT, and the final stage
(the one no other stage uses) as OUT. An intermediate whose recipe, inputs' stages,
seed and compute options did not change is reused on a rerun. The work folder is removed
after a successful run unless ``keep_intermediates``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shoal._atomic import refuse_output_holding
from shoal.errors import OutputExistsError, RecipeError, ShoalError
from shoal.recipe import Recipe, load_recipe, rename_models
from shoal.recipe.load import _StrictLoader


@dataclass(frozen=True)
class Stage:
    """One document of a multi-stage recipe.

    Attributes:
        name: its ``name`` (the final stage may have none).
        data: the recipe without ``name``, model names of other stages still as written.
        index: its position in the file (0-based).
    """

    name: str | None
    data: dict[str, Any]
    index: int


def read_stages(path: str | Path) -> list[Stage] | None:
    """The stages of a recipe file, or ``None`` when it is a plain one-document recipe.

    A file of several YAML documents, or of one document with a ``name:`` key, is a
    multi-stage recipe.
    """
    file = Path(path)
    if not file.is_file():
        return None
    try:
        text = file.read_text()
        docs = [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # load_recipe reports it as the one-line error it always gives
    if not docs or not all(isinstance(d, Mapping) for d in docs):
        return None
    if len(docs) == 1 and "name" not in docs[0]:
        return None
    stages = []
    for i, doc in enumerate(docs):
        name = doc.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise RecipeError(f"{file}: document {i + 1}: name must be a non-empty string")
        if name is None and i != len(docs) - 1:
            raise RecipeError(f"{file}: document {i + 1}: every stage but the last needs a name")
        data = {k: v for k, v in doc.items() if k != "name"}
        stages.append(Stage(name, data, i))
    names = [s.name for s in stages if s.name]
    for name in names:
        if names.count(name) > 1:
            raise RecipeError(f"{file}: stage name {name!r} given twice")
    return stages


def _uses(stage: Stage, names: set[str]) -> set[str]:
    """The stage names ``stage`` takes as models."""
    probe = load_recipe(stage.data)  # validated below with the real paths; refs only here
    return {ref for ref in probe.model_refs() if ref in names}


def _order(file: Path, stages: list[Stage]) -> tuple[list[Stage], dict[str, set[str]]]:
    """Stages in dependency order, and what each uses; the final stage comes last."""
    names = {s.name for s in stages if s.name}
    uses: dict[str, set[str]] = {}
    for s in stages:
        try:
            uses[s.name or ""] = _uses(s, names)
        except RecipeError as exc:
            raise RecipeError(f"{file}: stage {s.name or s.index + 1}: {_strip(exc)}") from None
    used = set().union(*uses.values())
    finals = [s for s in stages if (s.name or "") not in used]
    if len(finals) != 1:
        listed = ", ".join(repr(s.name) for s in finals)
        raise RecipeError(
            f"{file}: one stage must be the final one (used by no other), found {listed}"
        )
    ordered: list[Stage] = []
    state: dict[str, str] = {}
    by_name = {s.name or "": s for s in stages}

    def visit(key: str, chain: list[str]) -> None:
        if state.get(key) == "done":
            return
        if state.get(key) == "visiting":
            raise RecipeError(
                f"{file}: stages depend on each other in a cycle: {' -> '.join([*chain, key])}"
            )
        state[key] = "visiting"
        for dep in sorted(uses[key]):
            visit(dep, [*chain, key])
        state[key] = "done"
        ordered.append(by_name[key])

    for s in stages:
        visit(s.name or "", [])
    final = finals[0]
    unused = [s.name for s in ordered if s is not final and not _reaches(final, s, uses)]
    if unused:
        raise RecipeError(f"{file}: stage {unused[0]!r} is used by no stage leading to the output")
    return ordered, uses


def _reaches(final: Stage, stage: Stage, uses: dict[str, set[str]]) -> bool:
    seen: set[str] = set()
    todo = [final.name or ""]
    while todo:
        key = todo.pop()
        if key == stage.name:
            return True
        if key not in seen:
            seen.add(key)
            todo.extend(uses.get(key, ()))
    return False


def _strip(exc: RecipeError) -> str:
    return str(exc).removeprefix("recipe: ")


def _stage_hash(recipe: Recipe, deps: list[str], options: Mapping[str, Any]) -> str:
    blob = json.dumps(
        {"recipe": recipe.content_hash(), "deps": deps, "options": dict(options)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _validated(
    file: Path, stages: list[Stage], work: Path, strict: bool
) -> tuple[list[Stage], dict[str, set[str]], list[Recipe]]:
    """Stages in dependency order, what each uses, and each one's recipe (stage names
    replaced by their folders in ``work``); every stage validated."""
    ordered, uses = _order(file, stages)
    paths = {s.name: str((work / s.name).resolve()) for s in ordered if s.name}
    recipes: list[Recipe] = []
    for s in ordered:
        try:
            recipe = load_recipe(rename_models(s.data, paths), strict=strict)
        except RecipeError as exc:
            raise RecipeError(f"{file}: stage {s.name or s.index + 1}: {_strip(exc)}") from None
        recipes.append(recipe.with_source_dir(file.resolve().parent))
    return ordered, uses, recipes


def _named(path: Path, models: Mapping[str, str]) -> tuple[list[Stage] | None, Recipe | None]:
    """A recipe file's stages, or its one recipe, with names of ``models`` made paths."""
    stages = read_stages(path)
    if stages is not None:
        own = {s.name for s in stages if s.name}
        rename = {k: v for k, v in models.items() if k not in own}  # a stage name wins
        return [Stage(s.name, rename_models(s.data, rename), s.index) for s in stages], None
    recipe = load_recipe(path)
    renamed = rename_models(recipe.to_dict(), dict(models))
    return None, load_recipe(renamed).with_source_dir(path.resolve().parent)


def check_recipe_file(path: str | Path, models: Mapping[str, str]) -> None:
    """Validate a recipe file (every stage of a multi-stage one) without merging.

    Args:
        path: The recipe file.
        models: Names the recipes may use for models (name -> path); a name whose path
            is empty (a model made later) is only checked to be known.

    Raises:
        RecipeError: Naming the file (and stage) and key.
    """
    from shoal.merge.sources import resolve_model_path

    file = Path(path)
    if not file.is_file():
        raise RecipeError(f"{file}: recipe file not found")
    later = {f"<{k}>" for k, v in models.items() if not v}  # made by an earlier step
    stages, recipe = _named(file, {k: v or f"<{k}>" for k, v in models.items()})
    work = file.parent / f".{file.name}.check"  # stage outputs' names only, never made
    if stages is None:
        assert recipe is not None
        named: list[tuple[str, Recipe]] = [(f"{file}", recipe)]
    else:
        ordered, _, recipes = _validated(file, stages, work, strict=False)
        named = [
            (f"{file}: stage {s.name or s.index + 1}", r)
            for s, r in zip(ordered, recipes, strict=True)
        ]
    made = {str((work / s.name).resolve()) for s in stages or [] if s.name}
    for where, r in named:
        for ref in r.model_refs():
            if ref in later or ref in made:
                continue
            try:
                resolve_model_path(ref, r)
            except ShoalError as exc:
                raise RecipeError(f"{where}: {exc}") from None


def merge_recipe_file(
    path: str | Path, out_dir: str | Path, models: Mapping[str, str], **options: Any
) -> Path:
    """``shoal merge`` of a recipe file (one stage or several) whose model names may be
    the given names (``models``: name -> path) as well as paths; returns ``out_dir``."""
    from shoal.merge.to_disk import merge_to_disk

    file = Path(path)
    stages, recipe = _named(file, models)
    if stages is not None:
        return merge_stages(file, stages, out_dir, **options)
    assert recipe is not None
    return merge_to_disk(recipe, out_dir, **options)


def merge_stages(
    path: str | Path,
    stages: list[Stage],
    out_dir: str | Path,
    *,
    keep_intermediates: bool = False,
    **options: Any,
) -> Path:
    """Run a multi-stage recipe (see the module docstring); returns ``out_dir``.

    Args:
        path: the recipe file (its directory resolves relative model paths).
        stages: from :func:`read_stages`.
        out_dir: where the final stage is written.
        keep_intermediates: keep the work folder after success.
        options: passed to :func:`~shoal.merge.to_disk.merge_to_disk` for every stage (device,
            dtype, seed, overwrite for the final output, ...).

    Raises:
        RecipeError: a stage is invalid, stages form a cycle, or there is no single final
            stage; every stage is checked before any is run.
    """
    from shoal.merge.sources import resolve_model_path
    from shoal.merge.to_disk import merge_to_disk

    file = Path(path)
    out = Path(out_dir)
    work = out.parent / f".{out.name}.stages"
    ordered, uses, recipes = _validated(file, stages, work, bool(options.get("strict", False)))
    # the output is checked before any stage runs, so a refused one leaves nothing behind
    made = {str((work / s.name).resolve()) for s in ordered if s.name}  # stages' results
    inputs: dict[str, str | Path] = {f"the recipe {file}": file}
    for recipe in recipes:
        for ref in recipe.model_refs():
            if ref not in made:
                inputs[f"the recipe's model {ref!r}"] = resolve_model_path(ref, recipe)
    refuse_output_holding(out, inputs)
    if out.exists() and not options.get("overwrite", False):
        raise OutputExistsError(f"{out}: output exists (pass --overwrite to replace it)")
    keyed = {k: v for k, v in options.items() if k in ("seed", "float32_compute", "dtype")}
    hashes: dict[str, str] = {}
    for s, recipe in zip(ordered, recipes, strict=True):
        key = s.name or ""
        digest = _stage_hash(recipe, [hashes[d] for d in sorted(uses[key])], keyed)
        hashes[key] = digest
        if s is ordered[-1]:
            merge_to_disk(recipe, out, **options)
            break
        target = work / key
        stamp = work / f"{key}.sha256"
        if target.is_dir() and stamp.is_file() and stamp.read_text().strip() == digest:
            continue  # unchanged since the last run: reused
        work.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)
        merge_to_disk(recipe, target, **{**options, "overwrite": True})
        stamp.write_text(digest + "\n")
    if not keep_intermediates:
        shutil.rmtree(work, ignore_errors=True)
    return out
