"""Parameter values: checking them against a method, and resolving them per tensor.

A value in a recipe is one of (METHODS.md §1, "any parameter may be given per layer"):

- a scalar: ``0.5``, ``true``, ``"l1"``;
- a list of numbers, a *gradient*: interpolated linearly over the layer position
  ``t ∈ [0, 1]`` (mergekit's gradient values);
- a list of ``{filter: <substring>, value: <scalar | gradient>}`` entries: the first
  entry whose filter is a substring of the tensor name (or that has no filter)
  gives the value; when none matches, the next wider scope is asked.

The layer position follows mergekit: within a slice of ``n`` layers, layer ``i`` sits at
``i / (n - 1)`` (``1`` when ``n == 1``); every tensor outside the blocks (embeddings,
final norm, head, pooler) uses ``t = 0``, as mergekit's planner reads them all at
``t = 0``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from shoal.errors import RecipeError
from shoal.recipe.methods import METHODS, MethodSpec, ParamSpec

Scalar = float | bool | str

# GPT-NeoX calls its output head ``embed_out``: a head, not an input embedding
_PRE_PATTERN = re.compile(r"(embed(?!_out)|(^|\.)wte\.|(^|\.)wpe\.)")

_RESCALE_BOOL = {True: "l1", False: "none"}


def is_pre_tensor(tensor_name: str) -> bool:
    """Whether a non-layer tensor comes before the blocks (input embeddings).

    This decides the output layout and which slice a tensor comes from, not its
    gradient position (every non-layer tensor has ``t = 0``).
    """
    return bool(_PRE_PATTERN.search(tensor_name))


def position(tensor_name: str, layer_index: int | None, num_layers: int | None) -> float:
    """Layer position ``t ∈ [0, 1]`` used to evaluate gradients.

    Args:
        tensor_name: the tensor's name (unused: kept so callers need not change).
        layer_index: index of the layer inside its slice, ``None`` outside the blocks.
        num_layers: number of layers in the slice.

    Returns:
        ``layer / (num_layers - 1)`` for block tensors (``1.0`` for one layer),
        ``0.0`` for every non-layer tensor (embeddings, final norm, head), as mergekit.
    """
    if layer_index is None or num_layers is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return layer_index / (num_layers - 1)


def interpolate(values: Sequence[float], t: float) -> float:
    """Piecewise-linear interpolation of ``values`` placed evenly over ``[0, 1]``."""
    if len(values) == 1:
        return float(values[0])
    t = min(max(t, 0.0), 1.0)
    scaled = t * (len(values) - 1)
    lo = min(int(scaled), len(values) - 2)
    frac = scaled - lo
    return float(values[lo]) * (1.0 - frac) + float(values[lo + 1]) * frac


def is_filter_list(value: Any) -> bool:
    """Whether a parameter setting is a list of ``{filter, value}`` entries."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], Mapping)


def filter_entry(value: list[Mapping[str, Any]], tensor_name: str) -> int | None:
    """Index of the first entry of a filter list that applies to ``tensor_name``."""
    for i, entry in enumerate(value):
        flt = entry.get("filter")
        if flt is None or flt in tensor_name:
            return i
    return None


def evaluate(value: Any, tensor_name: str, t: float) -> Scalar | None:
    """Value of one (already validated) parameter setting for one tensor.

    Returns ``None`` when ``value`` is a filter list and no entry applies to the tensor.
    """
    if is_filter_list(value):
        i = filter_entry(value, tensor_name)
        return None if i is None else evaluate(value[i]["value"], tensor_name, t)
    if isinstance(value, list):
        return interpolate(value, t)
    if isinstance(value, bool | str):
        return value
    return float(value)


def resolve(
    value: Any, tensor_name: str, layer_index: int | None, num_layers: int | None
) -> Scalar | None:
    """Resolve a parameter setting for a tensor at a layer (see module docstring).

    Args:
        value: a scalar, gradient list or filter list as written in the recipe.
        tensor_name: name of the output tensor.
        layer_index: layer index within the slice, ``None`` for non-layer tensors.
        num_layers: layers in the slice.

    Returns:
        The scalar value, or ``None`` when a filter list has no entry for this tensor.
    """
    return evaluate(value, tensor_name, position(tensor_name, layer_index, num_layers))


def _check_scalar(spec: ParamSpec, method: str, value: Any, where: str) -> Scalar:
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: {spec.name} must be true or false, got {value!r}")
        return value
    if spec.kind == "choice":
        if spec.name == "rescale" and isinstance(value, bool):
            return _RESCALE_BOOL[value]
        if not isinstance(value, str) or value not in spec.choices:
            raise RecipeError(
                f"{where}: {spec.name} must be one of {', '.join(spec.choices)}, got {value!r}"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecipeError(f"{where}: {spec.name} must be a number, got {value!r}")
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")):
        raise RecipeError(f"{where}: {spec.name} must be finite, got {value!r}")
    if (spec.lo is not None and number < spec.lo) or (spec.hi is not None and number > spec.hi):
        raise RecipeError(
            f"{where}: {spec.name} for {method} must lie in [{spec.lo:g}, {spec.hi:g}], "
            f"got {value!r}"
        )
    return number


def _check_setting(spec: ParamSpec, method: str, value: Any, where: str) -> Any:
    """Validate one setting (scalar, gradient or filter list); return it normalised."""
    if isinstance(value, list):
        if not value:
            raise RecipeError(f"{where}: {spec.name} is an empty list")
        if all(isinstance(v, Mapping) for v in value):
            out = []
            for i, entry in enumerate(value):
                here = f"{where}[{i}]"
                unknown = sorted(set(entry) - {"filter", "value"})
                if unknown:
                    raise RecipeError(
                        f"{here}.{unknown[0]}: unknown key in a filter entry (known: filter, value)"
                    )
                if "value" not in entry:
                    raise RecipeError(f"{here}: filter entry without a value")
                flt = entry.get("filter")
                if flt is not None and not isinstance(flt, str):
                    raise RecipeError(f"{here}.filter: must be a string, got {flt!r}")
                inner = entry["value"]
                if isinstance(inner, list) and any(isinstance(v, Mapping) for v in inner):
                    raise RecipeError(f"{here}.value: filter lists cannot nest")
                item: dict[str, Any] = {
                    "value": _check_setting(spec, method, inner, here + ".value")
                }
                if flt is not None:
                    item = {"filter": flt, **item}
                out.append(item)
            return out
        if any(isinstance(v, Mapping) for v in value):
            raise RecipeError(f"{where}: mixes filter entries and plain values")
        if spec.kind != "float":
            raise RecipeError(f"{where}: {spec.name} takes a single value, not a list")
        return [_check_scalar(spec, method, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        raise RecipeError(
            f"{where}: {spec.name} must be a value, a list or a list of {{filter, value}} entries"
        )
    return _check_scalar(spec, method, value, where)


class NoEffectWarning(UserWarning):
    """A recipe key that mergekit accepts and ignores for this method (shoal too)."""


def _no_effect(key: str, method: MethodSpec, where: str, strict: bool) -> None:
    """A parameter of another method given to ``method``: mergekit ignores it, so the
    recipe runs there; here it is one warning line, or an error under ``strict``."""
    message = f"{where}.{key}: {key} has no effect for {method.name} (ignored, as mergekit does)"
    if strict:
        raise RecipeError(f"{message}; refused by --strict")
    warnings.warn(message, NoEffectWarning, stacklevel=2)


def check_parameters(
    params: Mapping[str, Any] | None,
    method: MethodSpec,
    where: str,
    *,
    per_model: bool,
    strict: bool = False,
) -> dict[str, Any]:
    """Validate the ``parameters`` mapping of one scope against ``method``.

    Args:
        params: the mapping as written (``None`` for absent).
        method: the recipe's merge method.
        where: location for messages, e.g. ``models[1].parameters``.
        per_model: the scope is a model / slice source (only per-model parameters allowed).
        strict: a parameter another method knows but this one does not (a ``weight`` on
            ``slerp``) is an error; otherwise it is a :class:`NoEffectWarning` and dropped.

    Returns:
        The parameters with values normalised (numbers as float, ``rescale: true`` as ``l1``),
        without the ones that have no effect.

    Raises:
        RecipeError: naming the key and its location.
    """
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise RecipeError(f"{where}: must be a mapping of parameter names to values")
    out: dict[str, Any] = {}
    for key, value in params.items():
        spec = method.param(str(key))
        if spec is None and any(m.param(str(key)) for m in METHODS.values()):
            _no_effect(str(key), method, where, strict)
            continue
        if spec is None:
            known = ", ".join(method.param_names) or "none"
            raise RecipeError(
                f"{where}.{key}: unknown parameter for {method.name} (known: {known})"
            )
        if per_model and not spec.per_model:
            raise RecipeError(
                f"{where}.{key}: {key} is a global parameter of {method.name}; "
                "give it under the top-level or slice parameters"
            )
        out[str(key)] = _check_setting(spec, method.name, value, f"{where}.{key}")
    return out
