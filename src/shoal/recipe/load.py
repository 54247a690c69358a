"""Reading and validating recipes: YAML file, YAML text or a dict → :class:`Recipe`.

Every problem raises :class:`~shoal.errors.RecipeError` whose message names the
file (when there is one) and the key, e.g.
``merge.yaml: models[1].parameters.densty: unknown parameter for ties (known: ...)``.
The settings files of ``shoal evolve`` and ``shoal adapt`` are read with the same rules
(:func:`read_settings`, :func:`absolute_root`, :func:`settings_error`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from shoal._yaml import NumberLoader
from shoal.errors import RecipeError
from shoal.recipe.chat_templates import check_chat_template
from shoal.recipe.methods import METHODS, MethodSpec
from shoal.recipe.params import check_parameters
from shoal.recipe.schema import Recipe, Slice, SliceSource, canonical_dtype


def _loc_text(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<recipe>"


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel]:
    """The schema class that holds the last key of ``loc``."""
    from shoal.recipe.schema import ModelEntry, TokenEntry, TokenizerBlock

    nested: dict[str, type[BaseModel]] = {
        "models": ModelEntry,
        "slices": Slice,
        "sources": SliceSource,
        "tokenizer": TokenizerBlock,
        "tokens": TokenEntry,
    }
    current: type[BaseModel] = Recipe
    for part in loc[:-1]:
        if isinstance(part, str) and part in nested:
            current = nested[part]
    return current


def _pydantic_message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    where = _loc_text(loc)
    if err["type"] == "extra_forbidden":
        holder = _model_at(loc)
        known = ", ".join(holder.model_fields)
        return f"{where}: unknown key (known: {known})"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    return f"{where}: {err['msg']} (got {err.get('input')!r})"


def _read_source(source: str | Path | Mapping[str, Any]) -> tuple[Any, Path | None, str]:
    """Return (data, directory of the file or None, label for messages)."""
    if isinstance(source, Mapping):
        return dict(source), None, "recipe"
    text: str
    path: Path | None = None
    if isinstance(source, Path) or ("\n" not in source and not source.lstrip().startswith("{")):
        path = Path(source)
        if not path.is_file() and isinstance(source, str) and ": " in source:
            path = None  # one-line YAML text such as "merge_method: linear"
        elif not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
    if path is not None:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
    else:
        text = str(source)
    label = str(path) if path else "recipe"
    return parse_yaml(text, label), (path.resolve().parent if path else None), label


class _StrictLoader(NumberLoader):  # YAML 1.2 numbers: 1e-3 is a float
    """PyYAML's safe loader, refusing a key given twice in one mapping.

    YAML says keys are unique, but PyYAML silently keeps the last one, so a recipe
    with two ``merge_method:`` lines would run with the second.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, merged below
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                repeated = key in seen
                seen.add(key)
            except TypeError:  # a list or mapping as a key
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain value", key_node.start_mark
                ) from None
            if repeated:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, label: str) -> Any:
    """Parse YAML ``text``; a syntax error or a repeated key is one :class:`RecipeError` line.

    Args:
        text: The YAML document.
        label: The file name (or ``"recipe"``) the error message starts with.
    """
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{label}{where}: not valid YAML: {' '.join(problem.split())}") from None


def read_settings(
    source: str | Path | Mapping[str, Any], root: str | Path | None = None
) -> tuple[dict[str, Any], str, Path]:
    """A settings file (an evolve or adapt config) as a plain dict, its label and folder.

    Args:
        source: A YAML file path or an already parsed mapping (deep-copied).
        root: The folder relative paths resolve against; default the file's folder (the
            working directory for a mapping).

    Returns:
        ``(data, label, folder)``: the mapping, the name errors start with, and the
        default folder for :func:`absolute_root`.

    Raises:
        RecipeError: A missing file, bad YAML, or a top level that is not a mapping.
    """
    if isinstance(source, Mapping):
        data: Any = yaml.safe_load(yaml.safe_dump(dict(source)))  # deep copy, plain types
        label = "config"
        folder = Path(root) if root is not None else Path.cwd()
    else:
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise RecipeError(f"{path}: config file not found")
        data = parse_yaml(path.read_text(encoding="utf-8", errors="replace"), label)
        folder = Path(root) if root is not None else path.resolve().parent
    if not isinstance(data, dict):
        raise RecipeError(f"{label}: expected a mapping at the top level")
    return data, label, folder


def absolute_root(data: dict[str, Any], folder: Path) -> None:
    """Set ``data["root"]`` absolute: a given root relative to ``folder``, else ``folder``.

    Stored absolute so that a saved config means the same from any working directory.
    """
    given = data.get("root")
    root = folder if given in (None, "") else Path(str(given)).expanduser()
    data["root"] = str((folder / root).resolve())


def settings_error(exc: ValidationError, label: str) -> RecipeError:
    """A pydantic error of a settings file as one line naming the file and the key path."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return RecipeError(f"{label}: {loc}: unknown key")
    return RecipeError(f"{label}: {loc}: {err['msg'].removeprefix('Value error, ')}")


def _check_structure(recipe: Recipe, method: MethodSpec) -> None:
    if (recipe.models is None) == (recipe.slices is None):
        raise RecipeError("give exactly one of models: or slices:")
    if method.needs_base and not recipe.base_model:
        raise RecipeError(f"base_model: required by {method.name}")
    for key in ("dtype", "out_dtype"):
        value = getattr(recipe, key)
        if value is not None and canonical_dtype(value) is None:
            raise RecipeError(
                f"{key}: unknown dtype {value!r} (use float32, float16, bfloat16, float64)"
            )
    _check_tokenizer(recipe)
    if recipe.chat_template is not None:
        check_chat_template(recipe.chat_template)
    if recipe.models is not None:
        _check_counts(
            method,
            [m.model for m in recipe.models],
            recipe.base_model,
            "models",
            len(recipe.models),
        )
    for i, sl in enumerate(recipe.slices or []):
        _check_slice(method, sl, recipe.base_model, i)


def _recipe_models(recipe: Recipe) -> list[str]:
    refs = [recipe.base_model] if recipe.base_model else []
    refs += [m.model for m in recipe.models or []]
    refs += [s.model for sl in recipe.slices or [] for s in sl.sources]
    return refs


def _check_tokenizer(recipe: Recipe) -> None:
    """``tokenizer_source`` / the ``tokenizer:`` block: what shoal supports of them."""
    block = recipe.tokenizer
    if block is not None and recipe.tokenizer_source is not None:
        raise RecipeError("tokenizer: give either tokenizer_source or tokenizer:, not both")
    key = "tokenizer.source" if block is not None else "tokenizer_source"
    tok = recipe.vocabulary_source()
    if tok is not None and tok.startswith("model:"):
        raise RecipeError(
            f"{key}: {tok!r} is not supported (write the model's path without 'model:')"
        )
    models = _recipe_models(recipe)
    special = ("base", "union")
    if tok is not None and tok not in special and recipe.base_model is None and tok not in models:
        raise RecipeError(f"{key}: {tok!r} is neither 'base' nor a model of the recipe")
    if tok == "base" and recipe.base_model is None:
        raise RecipeError(f"{key}: 'base' needs a base_model")
    for token, entry in ((block.tokens or {}) if block else {}).items():
        _check_token_entry(f"tokenizer.tokens.{token}", entry.source, entry.force, models)


def _check_token_entry(where: str, source: Any, force: bool, models: list[str]) -> None:
    if source is None:
        if force:
            raise RecipeError(f"{where}.force: needs a source (a model, zero or model_token)")
        return
    if isinstance(source, str):
        if source != "zero" and source not in models:
            raise RecipeError(
                f"{where}.source: {source!r} is not a model of the recipe "
                "(a model path, zero, {kind: zero} or {kind: model_token, ...})"
            )
        return
    kind = source.get("kind")
    allowed = {"zero": {"kind"}, "model_token": {"kind", "model", "token", "token_id"}}
    if kind not in allowed:
        raise RecipeError(f"{where}.source.kind: {kind!r} is not zero or model_token")
    extra = sorted(set(source) - allowed[kind])
    if extra:
        known = ", ".join(sorted(allowed[kind]))
        raise RecipeError(f"{where}.source.{extra[0]}: unknown key (known: {known})")
    if kind == "model_token":
        if source.get("model") not in models:
            raise RecipeError(
                f"{where}.source.model: {source.get('model')!r} is not a model of the recipe"
            )
        given = [k for k in ("token", "token_id") if source.get(k) is not None]
        if len(given) != 1:
            raise RecipeError(f"{where}.source: give exactly one of token or token_id")
        value = source[given[0]]
        if given[0] == "token" and not isinstance(value, str):
            raise RecipeError(f"{where}.source.token: a token string, got {value!r}")
        if given[0] == "token_id" and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0
        ):
            raise RecipeError(f"{where}.source.token_id: a token id >= 0, got {value!r}")


def _check_counts(
    method: MethodSpec, refs: list[str], base: str | None, where: str, given: int
) -> None:
    apart = method.uses_base(base)  # the origin, not one of the models
    others = [r for r in refs if r != base] if apart else refs
    lo, hi = method.min_models, method.max_models
    if len(others) < lo or (hi is not None and len(others) > hi):
        want = f"exactly {lo}" if lo == hi else f"at least {lo}"
        what = "models besides base_model" if apart else "models"
        raise RecipeError(
            f"{where}: {method.name} needs {want} {what}, got {len(others)} (of {given} listed)"
        )


def _check_slice(method: MethodSpec, sl: Slice, base: str | None, i: int) -> None:
    lengths = []
    for j, src in enumerate(sl.sources):
        a, b = src.layer_range
        if a < 0 or b <= a:
            raise RecipeError(
                f"slices[{i}].sources[{j}].layer_range: need 0 <= start < end, got [{a}, {b}]"
            )
        lengths.append(b - a)
    if len(set(lengths)) > 1:
        raise RecipeError(
            f"slices[{i}].sources: all sources of a slice need the same number of layers, "
            f"got {lengths}"
        )
    refs = [s.model for s in sl.sources]
    if method.needs_base and base not in refs:
        raise RecipeError(f"slices[{i}].sources: base_model {base!r} must be one of the sources")
    _check_counts(method, refs, base, f"slices[{i}].sources", len(refs))


def _check_required(recipe: Recipe, method: MethodSpec) -> None:
    for spec in method.params:
        if spec.default is not None:
            continue
        in_global = spec.name in (recipe.parameters or {})
        in_slices = bool(recipe.slices) and all(
            spec.name in (sl.parameters or {}) for sl in recipe.slices or []
        )
        if not (in_global or in_slices):
            raise RecipeError(f"parameters.{spec.name}: required by {method.name}")


def _validated(recipe: Recipe, strict: bool = False) -> Recipe:
    """Check the recipe against its method; return it with normalised parameter values."""
    method = METHODS.get(recipe.merge_method)
    if method is None:
        raise RecipeError(
            f"merge_method: unknown method {recipe.merge_method!r} (known: {', '.join(METHODS)})"
        )
    _check_structure(recipe, method)
    update: dict[str, Any] = {
        "parameters": check_parameters(
            recipe.parameters, method, "parameters", per_model=False, strict=strict
        )
        or None
    }
    if recipe.models is not None:
        update["models"] = [
            m.model_copy(
                update={
                    "parameters": check_parameters(
                        m.parameters,
                        method,
                        f"models[{i}].parameters",
                        per_model=True,
                        strict=strict,
                    )
                    or None
                }
            )
            for i, m in enumerate(recipe.models)
        ]
    if recipe.slices is not None:
        slices = []
        for i, sl in enumerate(recipe.slices):
            sources = [
                s.model_copy(
                    update={
                        "parameters": check_parameters(
                            s.parameters,
                            method,
                            f"slices[{i}].sources[{j}].parameters",
                            per_model=True,
                            strict=strict,
                        )
                        or None
                    }
                )
                for j, s in enumerate(sl.sources)
            ]
            params = check_parameters(
                sl.parameters, method, f"slices[{i}].parameters", per_model=False, strict=strict
            )
            slices.append(sl.model_copy(update={"sources": sources, "parameters": params or None}))
        update["slices"] = slices
    for key in ("dtype", "out_dtype"):
        value = getattr(recipe, key)
        if value is not None:
            update[key] = canonical_dtype(value)
    out = recipe.model_copy(update=update)
    _check_required(out, method)
    return out


def load_recipe(source: str | Path | Mapping[str, Any] | Recipe, *, strict: bool = False) -> Recipe:
    """Read and validate a recipe.

    Args:
        source: a path to a YAML file, YAML text, a mapping, or a :class:`Recipe`
            (validated again).
        strict: refuse a parameter that has no effect for the method (mergekit ignores
            it; by default it is a one-line :class:`~shoal.recipe.params.NoEffectWarning`).

    Returns:
        The validated recipe with normalised parameter values; relative model paths are
        later resolved against the current directory, then the YAML file's directory.

    Raises:
        RecipeError: unknown method or key, bad type, value out of range, wrong number
            of models; the message names the file and the key.
    """
    if isinstance(source, Recipe):
        data: Any = source.to_dict()
        directory, label = source.source_dir, "recipe"
    else:
        data, directory, label = _read_source(source)
    if not isinstance(data, Mapping):
        raise RecipeError(f"{label}: a recipe is a mapping of keys (merge_method, models, ...)")
    try:
        recipe = Recipe.model_validate(data)
        recipe = _validated(recipe, strict)
    except ValidationError as exc:
        raise RecipeError(f"{label}: {_pydantic_message(exc)}") from None
    except RecipeError as exc:
        raise RecipeError(f"{label}: {exc}") from None
    return recipe.with_source_dir(directory)
