"""Layer-path models: the models data-flow-space merging (METHODS.md §2, "DFS") builds.

A *layer path* is a sequence of (model, layer) pairs and one input scale per entry.
The model it describes has the embeddings, final norm, head and tokenizer of the
*head model* (``base_model`` if the recipe names one, else the first model), and
runs the hidden state through the listed decoder layers in order; the hidden state
entering path entry h is multiplied by ``scales[h]`` (the paper's W_ij for the hop
from the previous layer i into layer j).

The recipe (``merge_method: layer_path``, a shoal extension validated here, not by
:mod:`shoal.recipe`)::

    merge_method: layer_path
    models: [{model: A}, {model: B}]
    parameters:
      path: [[A, 0], [B, 1], [B, 1], [A, 2]]    # a layer may repeat
      scales: [1.0, 0.9, 1.1, 1.0]              # optional, default all 1

In memory (:func:`build_layer_path_model`) the layers are *shared* with the source
models — a new module tree over the same parameter tensors, no weight copies — with
each path entry's ``layer_idx`` renumbered so that the KV cache and generation work,
and a forward pre-hook applying its scale. :func:`export_layer_path` writes a plain
Hugging Face directory (layers renamed ``model.layers.<h>.*``, ``num_hidden_layers``
= path length) whose ``config.json`` also holds ``shoal_layer_scales`` and
``shoal_layer_path``; :func:`load_model` loads it and re-applies the scales. With all
scales 1 any transformers install loads it as an ordinary stacked checkpoint.

Vision-language models (LLaVA-style, ``docs/vlm.md``) take part through their language
model: the path runs over the VLM's language layers (``model.language_model.layers``)
and a causal LM's, and the result is a VLM whose vision tower and projector are the
first VLM's (the head model if it is one, else the first VLM among the models), shared
as they are. A causal-LM head then gives the language part's embeddings, norm and head.
:func:`load_model` loads a VLM directory as a VLM.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from shoal.errors import CheckpointError, MergeError, RecipeError
from shoal.merge.vlm import is_vlm_dir

__all__ = [
    "LayerPath",
    "apply_layer_scales",
    "build_from_recipe",
    "build_layer_path_model",
    "decoder_layers",
    "export_layer_path",
    "load_model",
    "parse_layer_path",
]

_RECIPE_KEYS = {"merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "name"}
_PARAM_KEYS = {"path", "scales"}
# where causal LMs keep their decoder blocks (llama/mistral/qwen2, gpt2, gpt-neox, opt)
# (and a LLaVA-style VLM its language model's, ``model.language_model.layers``)
_LAYER_ATTRS = (
    "model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "model.language_model.layers",
)


@dataclass(frozen=True)
class LayerPath:
    """A validated ``layer_path`` recipe.

    Attributes:
        models: Model references, in the recipe's order.
        head: The model giving embeddings, final norm, head, tokenizer and config.
        path: ``(model, layer)`` per path entry.
        scales: Input scale per path entry (same length as ``path``).
        dtype: Output dtype name, if the recipe gives one.
    """

    models: tuple[str, ...]
    head: str
    path: tuple[tuple[str, int], ...]
    scales: tuple[float, ...]
    dtype: str | None = None

    def to_recipe(self) -> dict[str, Any]:
        """The recipe dict this path stands for."""
        recipe: dict[str, Any] = {
            "merge_method": "layer_path",
            "models": [{"model": m} for m in self.models],
            "parameters": {"path": [[m, i] for m, i in self.path], "scales": list(self.scales)},
        }
        if self.head != self.models[0]:
            recipe["base_model"] = self.head
        if self.dtype:
            recipe["dtype"] = self.dtype
        return recipe


def _model_ref(entry: Any, where: str) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping):
        unknown = sorted(set(entry) - {"model", "parameters"})
        if unknown:
            raise RecipeError(f"{where}.{unknown[0]}: unknown key (known: model)")
        if entry.get("parameters"):
            raise RecipeError(f"{where}.parameters: layer_path takes no per-model parameters")
        if isinstance(entry.get("model"), str):
            return str(entry["model"])
    raise RecipeError(f"{where}: must be a model reference or {{model: <ref>}}")


def parse_layer_path(recipe: Mapping[str, Any], *, source: str = "recipe") -> LayerPath:
    """Validate a ``layer_path`` recipe dict.

    Args:
        recipe: The recipe as plain data.
        source: Name used in messages (a file path, ``recipe``...).

    Returns:
        The validated :class:`LayerPath`.

    Raises:
        RecipeError: naming the key at fault.
    """
    if not isinstance(recipe, Mapping):
        raise RecipeError(f"{source}: a layer_path recipe must be a mapping")
    unknown = sorted(set(recipe) - _RECIPE_KEYS)
    if unknown:
        raise RecipeError(f"{source}: {unknown[0]}: unknown key for layer_path")
    if recipe.get("merge_method") != "layer_path":
        raise RecipeError(f"{source}: merge_method must be layer_path")
    raw = recipe.get("models")
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"{source}: models: a non-empty list is required")
    models = tuple(_model_ref(e, f"{source}: models[{i}]") for i, e in enumerate(raw))
    head = recipe.get("base_model") or models[0]
    if head not in models:
        raise RecipeError(f"{source}: base_model {head!r} is not one of models")
    params = recipe.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise RecipeError(f"{source}: parameters must be a mapping")
    unknown = sorted(set(params) - _PARAM_KEYS)
    if unknown:
        raise RecipeError(
            f"{source}: parameters.{unknown[0]}: unknown parameter for layer_path "
            "(known: path, scales)"
        )
    raw_path = params.get("path")
    if not isinstance(raw_path, list) or not raw_path:
        raise RecipeError(f"{source}: parameters.path: a non-empty list of [model, layer]")
    path: list[tuple[str, int]] = []
    for h, item in enumerate(raw_path):
        where = f"{source}: parameters.path[{h}]"
        ok = isinstance(item, list | tuple) and len(item) == 2
        if not ok or not isinstance(item[1], int) or isinstance(item[1], bool) or item[1] < 0:
            raise RecipeError(f"{where}: must be [model, layer index ≥ 0], got {item!r}")
        if item[0] not in models:
            raise RecipeError(f"{where}: model {item[0]!r} is not one of models")
        path.append((str(item[0]), int(item[1])))
    raw_scales = params.get("scales")
    if raw_scales is None:
        scales = [1.0] * len(path)
    else:
        if not isinstance(raw_scales, list) or len(raw_scales) != len(path):
            raise RecipeError(
                f"{source}: parameters.scales: need one number per path entry ({len(path)})"
            )
        scales = []
        for h, s in enumerate(raw_scales):
            if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s):
                raise RecipeError(f"{source}: parameters.scales[{h}]: a finite number, got {s!r}")
            scales.append(float(s))
    dtype = recipe.get("out_dtype") or recipe.get("dtype")
    return LayerPath(models, str(head), tuple(path), tuple(scales), dtype)


# -- modules ------------------------------------------------------------------------------
def _get_attr(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The attribute path and the ``ModuleList`` of a causal LM's decoder blocks.

    Raises:
        MergeError: for an architecture whose blocks are not found.
    """
    for dotted in _LAYER_ATTRS:
        found = _get_attr(model, dotted)
        if isinstance(found, nn.ModuleList):
            return dotted, found
    raise MergeError(
        f"{type(model).__name__}: decoder layers not found (looked for {', '.join(_LAYER_ATTRS)})"
    )


def _scale_hook(scale: float) -> Any:
    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if args:
            return (args[0] * scale, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"] * scale
        return args, kwargs

    hook._shoal_scale = True  # type: ignore[attr-defined]
    return hook


def _drop_scale_hooks(layer: nn.Module) -> None:
    """Remove scale hooks a copied layer inherited from a loaded layer-path model."""
    hooks = layer._forward_pre_hooks
    for key in [k for k, h in hooks.items() if getattr(h, "_shoal_scale", False)]:
        del hooks[key]
        layer._forward_pre_hooks_with_kwargs.pop(key, None)


def apply_layer_scales(model: nn.Module, scales: Sequence[float]) -> None:
    """Scale the hidden state entering decoder layer h by ``scales[h]`` (forward pre-hooks).

    Replaces hooks set by an earlier call; scales of exactly 1 get no hook.

    Raises:
        MergeError: when the number of scales differs from the number of layers.
    """
    _, layers = decoder_layers(model)
    if len(scales) != len(layers):
        raise MergeError(f"{len(scales)} layer scales for a model with {len(layers)} layers")
    for handle in getattr(model, "_shoal_scale_hooks", []):
        handle.remove()
    handles = []
    for layer, s in zip(layers, scales, strict=True):
        if float(s) != 1.0:
            handles.append(layer.register_forward_pre_hook(_scale_hook(float(s)), with_kwargs=True))
    model._shoal_scale_hooks = handles  # type: ignore[assignment]


def _shared_memo(module: nn.Module) -> dict[int, Any]:
    """deepcopy memo mapping every parameter and buffer to itself (copy structure, share data)."""
    memo: dict[int, Any] = {id(p): p for p in module.parameters()}
    memo.update({id(b): b for b in module.buffers()})
    return memo


def _text_config(config: Any) -> Any:
    """The language model's config: a VLM's ``text_config``, else the config itself."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _vlm_language(model: nn.Module) -> nn.Module | None:
    """A LLaVA-style VLM's language model body (``model.language_model``), else ``None``."""
    inner = getattr(model, "model", None)
    body = getattr(inner, "language_model", None)
    if isinstance(body, nn.Module) and getattr(model.config, "vision_config", None) is not None:
        return body
    return None


def _into_vlm(lm: Any, vlm: Any) -> Any:
    """A copy of ``vlm`` whose language part is the causal LM ``lm`` (shared, not copied).

    The vision tower and projector share ``vlm``'s tensors; the language body and head are
    ``lm``'s modules, and ``config.text_config`` is ``lm``'s config.
    """
    body = _vlm_language(vlm)
    assert body is not None
    memo = _shared_memo(vlm)
    memo[id(body)] = lm.model
    memo[id(vlm.lm_head)] = lm.lm_head
    if hasattr(vlm, "_shoal_scale_hooks"):
        memo[id(vlm._shoal_scale_hooks)] = []
    out: Any = copy.deepcopy(vlm, memo=memo)
    out.config.text_config = lm.config
    return out


def build_layer_path_model(
    models: Mapping[str, Any],
    path: Sequence[tuple[str, int]],
    scales: Sequence[float] | None = None,
    *,
    head: str | None = None,
) -> Any:
    """Assemble a causal LM whose decoder layers are the listed source layers.

    No weights are copied: the new model's embeddings, norm and head are those of the
    head model, and every path entry is a fresh module over a source layer's tensors
    (so changing a source's weights changes the path model too). ``layer_idx`` of each
    entry is its path position; ``num_hidden_layers`` of the (text) config is the path
    length.

    When a source is a LLaVA-style VLM its language layers are the ones listed, and the
    result is a VLM: the head model if it is one, else the first VLM of ``models`` with
    the head's language body and output head in place of its own (vision tower and
    projector shared with that VLM).

    Args:
        models: Loaded source models (transformers causal LMs of one family, or VLMs whose
            language model is of that family), by name.
        path: ``(model name, layer index)`` per entry; an entry may repeat.
        scales: Input scale per entry (default all 1).
        head: Model giving embeddings, norm, head and config (default: first in ``path``'s
            models order, i.e. the first key of ``models``).

    Returns:
        A ``PreTrainedModel`` with ``config.shoal_layer_path`` and
        ``config.shoal_layer_scales`` set.

    Raises:
        MergeError: unknown model, layer out of range, or mismatched hidden sizes.
    """
    if not models:
        raise MergeError("layer_path: no source models given")
    head = head or next(iter(models))
    if head not in models:
        raise MergeError(f"layer_path: head model {head!r} is not loaded")
    scales = [1.0] * len(path) if scales is None else [float(s) for s in scales]
    if len(scales) != len(path):
        raise MergeError(f"layer_path: {len(scales)} scales for {len(path)} path entries")
    base = models[head]
    width = getattr(_text_config(base.config), "hidden_size", None)
    layers_of = {}
    for name, m in models.items():
        layers_of[name] = decoder_layers(m)[1]
        if getattr(_text_config(m.config), "hidden_size", None) != width:
            raise MergeError(
                f"layer_path: model {name!r} has hidden size "
                f"{getattr(_text_config(m.config), 'hidden_size', None)}, {head!r} has {width}"
            )
    new_layers = nn.ModuleList()
    for h, (name, i) in enumerate(path):
        if name not in models:
            raise MergeError(f"layer_path: path[{h}] names model {name!r}, which is not loaded")
        src = layers_of[name]
        if not 0 <= i < len(src):
            raise MergeError(
                f"layer_path: path[{h}] asks for layer {i} of {name!r}, which has {len(src)}"
            )
        layer = copy.deepcopy(src[i], memo=_shared_memo(src[i]))
        _drop_scale_hooks(layer)
        for sub in layer.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                cast(Any, sub).layer_idx = h  # KV-cache slot of this path position
        new_layers.append(layer)
    # copy the head model's structure without its layers, sharing all tensors
    memo = _shared_memo(base)
    memo[id(decoder_layers(base)[1])] = new_layers
    if hasattr(base, "_shoal_scale_hooks"):
        memo[id(base._shoal_scale_hooks)] = []
    model: Any = copy.deepcopy(base, memo=memo)
    if _vlm_language(base) is None:
        vlm = next((m for m in models.values() if _vlm_language(m) is not None), None)
        if vlm is not None:  # a causal-LM head: it becomes the first VLM's language part
            model = _into_vlm(model, vlm)
    cfg = model.config
    text = _text_config(cfg)
    types = getattr(_text_config(base.config), "layer_types", None)
    text.num_hidden_layers = len(path)
    if isinstance(types, list):
        cfg_of = {n: _text_config(models[n].config) for n in models}
        text.layer_types = [(getattr(cfg_of[n], "layer_types", None) or types)[i] for n, i in path]
    cfg.shoal_layer_path = [[n, i] for n, i in path]
    cfg.shoal_layer_scales = list(scales)
    apply_layer_scales(model, scales)
    return model


def build_from_recipe(recipe: Mapping[str, Any] | LayerPath, models: Mapping[str, Any]) -> Any:
    """Build the in-memory model of a ``layer_path`` recipe from loaded models.

    Args:
        recipe: The recipe dict (validated here) or a :class:`LayerPath`.
        models: Loaded source models by the names the recipe uses.
    """
    lp = recipe if isinstance(recipe, LayerPath) else parse_layer_path(recipe)
    missing = [m for m in lp.models if m not in models]
    if missing:
        raise MergeError(f"layer_path: model {missing[0]!r} is not loaded")
    return build_layer_path_model(
        {m: models[m] for m in lp.models}, lp.path, lp.scales, head=lp.head
    )


# -- disk -----------------------------------------------------------------------------------
def _load_hf(path: str | Path, dtype: torch.dtype | None = None) -> Any:
    import transformers

    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a model directory")
    vlm = is_vlm_dir(p)
    auto: Any = (
        transformers.AutoModelForImageTextToText if vlm else transformers.AutoModelForCausalLM
    )
    try:
        return auto.from_pretrained(p, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as exc:
        kind = "a vision-language model" if vlm else "a causal LM"
        raise CheckpointError(f"{p}: does not load as {kind} ({exc})") from exc


def load_model(path: str | Path, *, dtype: torch.dtype | None = None) -> Any:
    """Load a causal LM directory; layer-path exports get their input scales back.

    A vision-language model directory (a config with ``vision_config`` and
    ``text_config``) is loaded as one (``AutoModelForImageTextToText``).

    Args:
        path: A Hugging Face model directory (written by shoal or not).
        dtype: Optional dtype to load in.

    Returns:
        A transformers ``PreTrainedModel`` in eval mode.
    """
    model = _load_hf(path, dtype)
    scales = getattr(model.config, "shoal_layer_scales", None)
    if scales:
        apply_layer_scales(model, scales)
    return model.eval()


def _state_to_write(model: Any) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight:
        for name, mod in model.named_modules():
            if mod is out_emb:
                state.pop(f"{name}.weight", None)  # tied: transformers re-ties on load
    return state


def export_layer_path(
    model_or_recipe: Any,
    out_dir: str | Path,
    *,
    models: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write a layer-path model as a Hugging Face directory (atomically).

    Args:
        model_or_recipe: A model from :func:`build_layer_path_model`, or a ``layer_path``
            recipe (dict or :class:`LayerPath`) whose model references are directories.
        out_dir: Output directory (written to a temporary sibling, then renamed).
        models: For a recipe: already loaded models by name (else loaded from the paths).
        dtype: Cast floating tensors to this dtype (default: as they are).
        overwrite: Replace ``out_dir`` if it exists.
        max_shard_bytes: Shard size limit.

    Returns:
        ``out_dir``.
    """
    from shoal.checkpoint import ShardedWriter, copy_model_files

    model: Any
    if isinstance(model_or_recipe, nn.Module):
        model = model_or_recipe
        tok_dir = getattr(model.config, "_name_or_path", "") or ""
    else:
        lp = (
            model_or_recipe
            if isinstance(model_or_recipe, LayerPath)
            else parse_layer_path(model_or_recipe)
        )
        loaded = dict(models or {})
        for m in lp.models:
            if m not in loaded:
                loaded[m] = _load_hf(m)
        model = build_from_recipe(lp, loaded)
        tok_dir = lp.head if models is None or Path(lp.head).is_dir() else ""
    cfg = model.config
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        raise MergeError("layer_path export: scale_attn_by_inverse_layer_idx changes on reload")
    state = _state_to_write(model)
    with ShardedWriter(out_dir, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
        for name, tensor in state.items():
            t = tensor.detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            writer.add(name, t.contiguous().cpu())
        if tok_dir and Path(tok_dir).is_dir():
            copy_model_files(tok_dir, writer)  # tokenizer, generation config
        config = json.loads(cfg.to_json_string(use_diff=False))
        config.pop("_name_or_path", None)
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
        writer.write_text("config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)
