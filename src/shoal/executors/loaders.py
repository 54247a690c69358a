"""Loaders of a worker's resident model: the one module every candidate is built into.

- ``hf-causal-lm``: ``transformers.AutoModelForCausalLM`` from a model directory (the
  loader's ``model``, else the base model, else the first model), with its tokenizer.
- ``hf-vlm``: a vision-language model (``transformers.AutoModelForImageTextToText``, e.g.
  LLaVA) from ``loader.model``, else the base model if it is a VLM, else the first model
  that is one, with its tokenizer; recipes that merge its language part with causal LMs
  build into it (``docs/vlm.md``).
- ``diffusers-model``: a diffusers model (a pipeline's U-Net) from ``loader.model``, else the
  base, else the first model: a model folder (``unet/``) or a pipeline folder, whose
  ``unet`` is taken. :func:`diffusers_model` is the same loader as a ``callable`` target
  (``options: {path: ..., component: unet}``).
- ``callable``: ``target: "package.module:function"`` called with ``options`` as keyword
  arguments; it returns a ``torch.nn.Module`` or a ``(module, tokenizer)`` pair. This is how
  any torch model (e.g. the digits MLP) takes part.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from shoal._extras import import_extra
from shoal.errors import RecipeError
from shoal.merge.pipeline import is_pipeline
from shoal.merge.vlm import is_vlm_dir
from shoal.tasks.python import import_callable

__all__ = [
    "diffusers_class",
    "diffusers_model",
    "hf_model_dir",
    "hf_tokenizer",
    "load_resident",
    "loader_model",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def loader_model(
    loader: Mapping[str, Any], models: Mapping[str, str], base: str | None, kind: str
) -> tuple[str, Path]:
    """The model a ``kind`` loader reads, as ``(name, path)``: ``loader.model``, else the base
    model, else the first model (a config name or a path); ``hf-vlm`` without
    ``loader.model`` prefers the first vision-language model among them.

    Raises:
        RecipeError: no model at all, or an unknown name, naming the key.
    """
    name = loader.get("model") or base or next(iter(models), None)
    if kind == "hf-vlm" and not loader.get("model"):  # the base is often the plain LM
        vlms = [n for n in ([base] if base else []) + list(models) if is_vlm_dir(models.get(n, n))]
        name = vlms[0] if vlms else name
    if name is None:
        raise RecipeError(f"loader: {kind} needs loader.model or at least one model")
    path = Path(models.get(name, name))
    if name not in models and not path.exists():
        known = ", ".join(models) or "none"
        raise RecipeError(f"loader.model: unknown model {name!r} (known: {known})")
    return name, path


def hf_model_dir(
    loader: Mapping[str, Any],
    models: Mapping[str, str],
    base: str | None,
    kind: str = "hf-causal-lm",
) -> Path:
    """The directory the ``hf-causal-lm`` (or ``hf-vlm``, ``kind``) loader reads
    (:func:`loader_model`), checked to be a Hugging Face model directory of that kind.

    Raises:
        RecipeError: An unknown name, or a directory without ``config.json``, naming the key.
    """
    name, path = loader_model(loader, models, base, kind)
    if not (path / "config.json").is_file():
        where = "loader.model" if loader.get("model") else f"models.{name}"
        raise RecipeError(
            f"{where}: {path} is not a Hugging Face model directory (no config.json), "
            f"which the {kind} loader needs"
        )
    if kind == "hf-vlm" and not is_vlm_dir(str(path)):
        where = "loader.model" if loader.get("model") else "models"
        raise RecipeError(
            f"{where}: {path} is not a vision-language model (no vision_config in its "
            "config.json), which the hf-vlm loader needs"
        )
    return path


def hf_tokenizer(path: Path) -> Any:
    """The tokenizer saved with the model at ``path``, or ``None`` if it has none."""
    import transformers

    auto_tok: Any = transformers.AutoTokenizer
    try:
        return auto_tok.from_pretrained(path)
    except (OSError, ValueError):
        return None


def diffusers_model(path: str | Path, component: str = "unet") -> torch.nn.Module:
    """A diffusers model (``UNet2DModel``, ``VQModel``, ...) as its config names it.

    Args:
        path: a model folder (``config.json`` with ``_class_name``) or a pipeline folder
            (``model_index.json``), whose ``component`` is loaded.
        component: the pipeline component to load when ``path`` is a pipeline.

    Raises:
        RecipeError: no diffusers config there, or a class diffusers does not have.
    """
    folder, cls = diffusers_class(path, component)
    model: torch.nn.Module = cls.from_pretrained(str(folder))  # type: ignore[attr-defined]
    return model


def diffusers_class(path: str | Path, component: str = "unet") -> tuple[Path, type]:
    """The folder :func:`diffusers_model` loads and the diffusers class its config names,
    read without loading any weights (the pre-run check calls it).

    Raises:
        RecipeError: no diffusers config there, or a class diffusers does not have.
    """
    import json

    folder = Path(path)
    if is_pipeline(folder):
        folder = folder / component
    cfg = folder / "config.json"
    try:
        name = json.loads(cfg.read_text(encoding="utf-8"))["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        raise RecipeError(f"{cfg}: not a diffusers model config (no _class_name)") from None
    diffusers = import_extra("diffusers", "diffusion", "the diffusers-model loader")

    # its advice on casting with .to(dtype) is noise here: the loader casts on purpose
    diffusers.utils.logging.set_verbosity_error()
    cls = getattr(diffusers, str(name), None)
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise RecipeError(f"{cfg}: diffusers has no model class {name!r}")
    return folder, cls


def load_resident(
    loader: Mapping[str, Any],
    models: Mapping[str, str],
    base_model: str | None,
    device: str = "cpu",
) -> tuple[torch.nn.Module, Any]:
    """Load the resident model and its tokenizer (``None`` when there is none).

    Args:
        loader: The loader block as a dict (``type``, ``model``, ``target``, ``options``,
            ``dtype``).
        models: Model name -> path.
        base_model: Name of the base model or ``None``.
        device: Torch device to put the model on.

    Returns:
        ``(module, tokenizer)``; the module is in eval mode with gradients off.
    """
    kind = loader.get("type", "hf-causal-lm")
    dtype = _DTYPES[loader.get("dtype", "float32")]
    tokenizer: Any = None
    if kind == "hf-causal-lm":
        import transformers

        transformers.utils.logging.disable_progress_bar()
        auto_model: Any = transformers.AutoModelForCausalLM
        path = hf_model_dir(loader, models, base_model)
        model = auto_model.from_pretrained(path, dtype=dtype)
        tokenizer = hf_tokenizer(path)
    elif kind == "hf-vlm":
        import transformers

        transformers.utils.logging.disable_progress_bar()
        auto_vlm: Any = transformers.AutoModelForImageTextToText
        path = hf_model_dir(loader, models, base_model, kind)
        model = auto_vlm.from_pretrained(path, dtype=dtype)
        tokenizer = hf_tokenizer(path)
    elif kind == "diffusers-model":
        model = diffusers_model(loader_model(loader, models, base_model, kind)[1]).to(dtype=dtype)
    elif kind == "callable":
        fn = import_callable(str(loader.get("target")), "loader.target", RecipeError)
        try:
            out = fn(**dict(loader.get("options") or {}))
        except TypeError as exc:  # options that do not fit, or no factory at all
            raise RecipeError(f"loader.target {loader.get('target')!r}: {exc}") from None
        model, tokenizer = out if isinstance(out, tuple) else (out, None)
        if not isinstance(model, torch.nn.Module):
            raise RecipeError(f"loader.target {loader.get('target')!r} returned no nn.Module")
        model = model.to(dtype=dtype)
    else:
        raise RecipeError(
            f"loader.type: unknown loader {kind!r} "
            "(hf-causal-lm, hf-vlm, diffusers-model, callable)"
        )
    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
