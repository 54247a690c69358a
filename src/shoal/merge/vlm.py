"""Vision-language checkpoints: merging only the language part with a plain causal LM.

A LLaVA-style checkpoint holds a vision tower, a projector and a language model. When a
recipe names such a checkpoint *and* a plain causal LM, the two cannot be merged name
by name: the VLM's language tensors carry a prefix the LM lacks. Here the VLM is seen
through its language part (:class:`LanguageView`), whose names are the causal LM's own
(``model.layers.0...``, ``lm_head.weight``), so the planner merges it with the LM like any
two causal LMs; :func:`finish_vlm_plan` then renames the merged tensors back into the VLM
and adds every other tensor of the VLM (vision tower, projector) as an unchanged copy.

Two layouts of the names are recognised:

- ``module`` (what ``LlavaForConditionalGeneration.state_dict()`` holds in transformers 5):
  ``model.language_model.*`` ↔ ``model.*``, ``lm_head.*`` ↔ ``lm_head.*``, the rest
  (``model.vision_tower.*``, ``model.multi_modal_projector.*``) outside the language part;
- ``legacy`` (what ``save_pretrained`` writes, transformers 4 and 5):
  ``language_model.model.*`` ↔ ``model.*``, ``language_model.lm_head.*`` ↔ ``lm_head.*``,
  the rest (``vision_tower.*``, ``multi_modal_projector.*``) outside.

The output is always written in the ``module`` layout, the names the live module holds,
so ``shoal merge`` and ``shoal evolve`` (which merges into a resident module) agree;
transformers loads either layout. Only language models whose causal-LM class keeps its
body under ``model.`` are covered (Llama, Mistral, Qwen2, Gemma, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

from shoal.errors import MergeError

if TYPE_CHECKING:
    from shoal.merge.plan import MergePlan
    from shoal.merge.sources import TensorSource
    from shoal.recipe import Recipe

__all__ = [
    "LAYOUTS",
    "LanguageView",
    "VLMLayout",
    "detect_layout",
    "finish_vlm_plan",
    "is_vlm_config",
    "is_vlm_dir",
    "language_shapes",
    "language_views",
    "to_language_name",
    "to_layout",
    "to_vlm_name",
]


@dataclass(frozen=True)
class VLMLayout:
    """How one layout of a VLM names its language part.

    Attributes:
        name: ``module`` or ``legacy``.
        body: prefix of the language model's body in the VLM (``model.*`` in the LM).
        head: prefix of the output head in the VLM (``lm_head.*`` in the LM).
        rest: prefix the other tensors (vision tower, projector) get in the ``module``
            layout, added to their names in this one.
    """

    name: str
    body: str
    head: str
    rest: str


#: the two layouts, ``module`` first (the one outputs are written in)
LAYOUTS: dict[str, VLMLayout] = {
    "module": VLMLayout("module", "model.language_model.", "lm_head.", ""),
    "legacy": VLMLayout("legacy", "language_model.model.", "language_model.lm_head.", "model."),
}
_MODULE = LAYOUTS["module"]


def detect_layout(names: list[str] | tuple[str, ...]) -> VLMLayout | None:
    """The layout of a checkpoint's tensor names, or ``None`` for a model that is no VLM.

    A VLM has language tensors under one layout's body prefix and at least one tensor
    outside its language part (the vision tower).
    """
    for layout in LAYOUTS.values():
        language = [n for n in names if n.startswith((layout.body, layout.head))]
        if any(n.startswith(layout.body) for n in names) and len(language) < len(names):
            return layout
    return None


def to_language_name(name: str, layout: VLMLayout) -> str | None:
    """The causal LM's name of a VLM tensor, or ``None`` when it is outside the language part.

    >>> to_language_name("language_model.model.layers.0.mlp.up_proj.weight", LAYOUTS["legacy"])
    'model.layers.0.mlp.up_proj.weight'
    >>> to_language_name("model.vision_tower.x", LAYOUTS["module"]) is None
    True
    """
    if name.startswith(layout.body):
        return "model." + name[len(layout.body) :]
    if name.startswith(layout.head):
        return "lm_head." + name[len(layout.head) :]
    return None


def to_vlm_name(name: str, layout: VLMLayout = _MODULE) -> str:
    """The VLM's name of a causal-LM tensor (the inverse of :func:`to_language_name`).

    >>> to_vlm_name("model.norm.weight")
    'model.language_model.norm.weight'

    Raises:
        MergeError: the name is neither under ``model.`` nor ``lm_head.``.
    """
    if name.startswith("model."):
        return layout.body + name[len("model.") :]
    if name.startswith("lm_head."):
        return layout.head + name[len("lm_head.") :]
    raise MergeError(
        f"tensor {name!r}: only causal LMs with a model.* body and an lm_head.* head map "
        "into a vision-language model's language part"
    )


def to_layout(name: str, src: VLMLayout, dst: VLMLayout = _MODULE) -> str:
    """A VLM tensor's name in another layout (language part and the rest alike).

    >>> to_layout("vision_tower.x", LAYOUTS["legacy"])
    'model.vision_tower.x'
    >>> to_layout("language_model.lm_head.weight", LAYOUTS["legacy"])
    'lm_head.weight'
    """
    lm_name = to_language_name(name, src)
    if lm_name is not None:
        return to_vlm_name(lm_name, dst)
    module = _module_name(name, src)
    return module[len(dst.rest) :] if module.startswith(dst.rest) else module


def _module_name(name: str, layout: VLMLayout) -> str:
    """A tensor outside the language part, named as the ``module`` layout names it."""
    return layout.rest + name


def is_vlm_config(config: Any) -> TypeGuard[Mapping[str, Any]]:
    """Whether a ``config.json`` (as a dict) describes a LLaVA-style vision-language model:
    a ``vision_config`` beside a ``text_config``. The one test every part uses."""
    return (
        isinstance(config, Mapping)
        and isinstance(config.get("vision_config"), Mapping)
        and isinstance(config.get("text_config"), Mapping)
    )


def is_vlm_dir(path: str | Path | None) -> bool:
    """Whether the model directory ``path`` holds a vision-language model (:func:`is_vlm_config`
    of its ``config.json``; ``False`` when there is none or it is unreadable)."""
    if path is None:
        return False
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return is_vlm_config(config)


def _text_config(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not config:
        return None
    sub = config.get("text_config")
    return dict(sub) if isinstance(sub, Mapping) else None


class LanguageView:
    """A VLM source seen as its language model (a :class:`~shoal.merge.sources.TensorSource`).

    ``keys()`` lists the language tensors under the causal LM's names. The other tensors
    (vision tower, projector) stay readable under their own names — ``shape``, ``dtype``,
    ``get`` and ``in`` accept them — but are not listed, so a plan over ``keys()`` sees a
    causal LM; :meth:`outside` lists them.

    Args:
        source: the VLM's source.
        layout: its layout (:func:`detect_layout`).

    Raises:
        MergeError: a name outside the language part equals a language name.
    """

    def __init__(self, source: TensorSource, layout: VLMLayout) -> None:
        self.source = source
        self.layout = layout
        self.path = source.path
        #: the VLM's whole config (the output's config); :attr:`text_config` is its LM's
        self.config = source.config
        self.text_config = _text_config(source.config)
        self._names: dict[str, str] = {}
        self._outside: list[str] = []
        names = source.keys()  # a TensorSource lists its names, it need not iterate
        for name in names:
            lm_name = to_language_name(name, layout)
            if lm_name is None:
                self._outside.append(name)
            else:
                self._names[lm_name] = name
        clash = next((n for n in self._outside if n in self._names), None)
        if clash is not None:
            raise MergeError(f"model {self.path}: tensor {clash!r} is both vision and language")

    def keys(self) -> list[str]:
        """The language tensors, under the causal LM's names, in the VLM's order."""
        return list(self._names)

    def outside(self) -> list[str]:
        """The VLM's tensors outside the language part, under their own names."""
        return list(self._outside)

    def original(self, name: str) -> str:
        """The VLM's own name of ``name`` (a language name or an outside name)."""
        return self._names.get(name, name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.original(name) in self.source

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor (no data read)."""
        return tuple(self.source.shape(self.original(name)))

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of one tensor (no data read)."""
        return self.source.dtype(self.original(name))

    def get(
        self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Read one tensor."""
        return self.source.get(self.original(name), device=device, dtype=dtype)

    def close(self) -> None:
        """Closing is left to whoever opened the underlying source."""


def language_views(
    sources: MutableMapping[str, TensorSource], refs: list[str] | None = None
) -> dict[str, LanguageView]:
    """Replace every VLM in ``sources`` by its :class:`LanguageView` when it meets a causal LM.

    Nothing changes unless the sources mix at least one VLM and one model that is not:
    VLMs merged only with VLMs keep every tensor (vision towers merged as well).

    Args:
        sources: model reference → source; changed in place.
        refs: the references in recipe order (default: the mapping's order).

    Returns:
        The views made, by reference.

    Raises:
        MergeError: a VLM's language part is another architecture than a causal LM of the
            recipe (``text_config.model_type`` against ``model_type``), naming both.
    """
    order = refs if refs is not None else list(sources)
    layouts = {ref: detect_layout(sources[ref].keys()) for ref in order}
    vlms = [ref for ref in order if layouts[ref] is not None]
    plain = [ref for ref in order if layouts[ref] is None]
    if not vlms or not plain:
        return {}
    views: dict[str, LanguageView] = {}
    for ref in vlms:
        layout = layouts[ref]
        assert layout is not None
        views[ref] = LanguageView(sources[ref], layout)
    for ref in plain:
        lm_type = (sources[ref].config or {}).get("model_type")
        for vref, view in views.items():
            text_type = (view.text_config or {}).get("model_type")
            if lm_type and text_type and lm_type != text_type:
                raise MergeError(
                    f"model {vref}: its language part is {text_type} but model {ref} is "
                    f"{lm_type}; a VLM's language part merges only with a causal LM of its "
                    "own architecture"
                )
    sources.update(views)
    return views


def language_shapes(
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
) -> dict[str, dict[str, tuple[int, ...]]]:
    """Tensor shapes per model as a merge sees them: where VLMs and causal LMs meet, each
    VLM's language tensors under the causal LM's names and its other tensors left out
    (the check before a run compares the models by these names).

    Args:
        shapes: model key → tensor name → shape, as the checkpoints' headers give them.
    """
    layouts = {key: detect_layout(list(names)) for key, names in shapes.items()}
    if all(v is None for v in layouts.values()) or all(v is not None for v in layouts.values()):
        return {key: dict(names) for key, names in shapes.items()}
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, names in shapes.items():
        layout = layouts[key]
        if layout is None:
            out[key] = dict(names)
            continue
        mapped = ((to_language_name(n, layout), shape) for n, shape in names.items())
        out[key] = {n: shape for n, shape in mapped if n is not None}
    return out


def finish_vlm_plan(
    plan: MergePlan, recipe: Recipe, sources: Mapping[str, TensorSource]
) -> MergePlan:
    """Turn a plan over language parts into a plan of the whole VLM.

    The merged tensors are renamed into the VLM (``module`` layout), and every tensor
    outside the language part of the recipe's first VLM (``base_model`` first, then the
    models in order) is added in front as an unchanged copy, in its own dtype. That VLM
    becomes the plan's reference (its config and files go with the output). A plan
    without a :class:`LanguageView` is returned as it is.
    """
    from shoal.merge.plan import TensorInput, TensorPlan

    lead = next((r for r in recipe.model_refs() if isinstance(sources.get(r), LanguageView)), None)
    if lead is None:
        return plan
    view = sources[lead]
    assert isinstance(view, LanguageView)
    kept: list[TensorPlan] = []
    for name in view.outside():
        dtype = view.dtype(name)
        kept.append(
            TensorPlan(
                _module_name(name, view.layout),
                view.shape(name),
                dtype,
                None,
                (TensorInput(lead, name),),
                {},
                copy=True,
                compute_dtype=dtype,
            )
        )
    merged = [replace(tp, name=to_vlm_name(tp.name)) for tp in plan.tensors]
    return replace(plan, tensors=kept + merged, reference=lead)
