"""The merge plan: for every output tensor, its inputs and resolved parameters.

Built from metadata only (names, shapes, dtypes), so a missing tensor or a shape
mismatch is reported — as :class:`~shoal.errors.MergeError` naming the tensor and
the model — before anything is read or written.

Layout follows mergekit: a ``models:`` recipe is one slice over all layers of the
reference model; a ``slices:`` recipe produces the input embeddings from its first
slice's sources, then each slice's layers in order (renumbered), then the final
norm / head from its last slice's sources. Parameter precedence, narrowest first:
slice source (or ``models[i]``) → slice → global → method default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shoal.checkpoint import layer_index, num_layers, rename_layer
from shoal.errors import MergeError, RecipeError
from shoal.merge.sources import TensorSource
from shoal.merge.vlm import is_vlm_config
from shoal.merge.vocab import is_vocab_tensor
from shoal.recipe import (
    METHODS,
    MethodSpec,
    Recipe,
    canonical_dtype,
    evaluate,
    is_pre_tensor,
    position,
)
from shoal.recipe.params import Scalar, filter_entry, is_filter_list

if TYPE_CHECKING:
    from shoal.merge.vocab import OutputVocabulary

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class TensorInput:
    """One input of an output tensor.

    Attributes:
        model: the model reference (as written in the recipe).
        name: the tensor's name in that model.
        params: per-model parameters resolved for this tensor (weight, density, ...).
    """

    model: str
    name: str
    params: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorPlan:
    """How to produce one output tensor.

    Attributes:
        name: output tensor name.
        shape: its shape.
        dtype: output dtype.
        base: the base model's input (``None`` for methods without a base).
        inputs: the other inputs, in recipe order (for slerp: the ``t = 1`` model;
            for splitpoint: ``[A, B]``).
        params: method-level parameters resolved for this tensor (t, lambda, ...).
        copy: copy the base / first input unchanged (non-float tensors, passthrough).
        group: splitpoint only: the chromosome, i.e. the index of the ``split`` filter
            entry that applies to this tensor (0 when ``split`` is not a filter list).
        compute_dtype: the dtype the merge computes in (mergekit's meaning of the
            recipe's ``dtype``; else the inputs' dtype; float32 when asked for).
        vocab: for an embedding / head tensor of a recipe with a tokenizer source, the
            output vocabulary its inputs' rows are realigned to before the merge.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    base: TensorInput | None
    inputs: tuple[TensorInput, ...]
    params: Mapping[str, Scalar]
    copy: bool = False
    group: int = 0
    compute_dtype: torch.dtype = torch.float32
    vocab: OutputVocabulary | None = field(default=None, compare=False, hash=False, repr=False)

    def all_inputs(self) -> tuple[TensorInput, ...]:
        """Base (if any) followed by the other inputs."""
        return ((self.base,) if self.base else ()) + self.inputs


@dataclass
class MergePlan:
    """A whole merge: method, output tensors in write order, and the output layout.

    Attributes:
        method: the merge method name.
        tensors: one :class:`TensorPlan` per output tensor, in write order.
        reference: the model whose config and non-layer tensor names are used.
        num_layers: blocks in the output when the recipe stacks slices, else ``None``.
        layer_sources: for each output block, the source block it comes from (slices).
        vocab: the output vocabulary when the recipe names a tokenizer source.
    """

    method: str
    tensors: list[TensorPlan]
    reference: str
    num_layers: int | None = None
    layer_sources: list[int] | None = None
    vocab: OutputVocabulary | None = None

    def writer_plan(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``{name: (shape, dtype)}`` for :class:`~shoal.checkpoint.ShardedWriter`."""
        return {t.name: (t.shape, t.dtype) for t in self.tensors}


def torch_dtype(name: str | None) -> torch.dtype | None:
    """Torch dtype of a recipe dtype string (``None`` stays ``None``)."""
    if name is None:
        return None
    canon = canonical_dtype(name)
    if canon is None:
        raise RecipeError(f"dtype: unknown dtype {name!r} (use float32, float16, bfloat16)")
    return _DTYPES[canon]


@dataclass(frozen=True)
class _Scope:
    """The parameter scopes that apply to one model inside one slice."""

    source: Mapping[str, Any] | None
    slice: Mapping[str, Any] | None
    glob: Mapping[str, Any] | None


def _lookup(
    spec_name: str,
    default: Scalar | None,
    scopes: Sequence[Mapping[str, Any] | None],
    name: str,
    t: float,
) -> Scalar:
    for scope in scopes:
        if scope and spec_name in scope:
            value = evaluate(scope[spec_name], name, t)
            if value is not None:
                return value
    if default is None:
        raise RecipeError(f"parameters.{spec_name}: no value applies to tensor {name!r}")
    return default


class _Planner:
    def __init__(
        self,
        recipe: Recipe,
        sources: Mapping[str, TensorSource],
        out_dtype: torch.dtype | None,
        compute_dtype: torch.dtype | None,
        vocab: OutputVocabulary | None = None,
    ) -> None:
        self.vocab = vocab
        self.recipe = recipe
        self.sources = sources
        self.out_dtype = out_dtype
        self.compute_dtype = compute_dtype
        spec = METHODS[recipe.merge_method]
        self.spec: MethodSpec = spec
        self.tensors: list[TensorPlan] = []
        self.seen: set[str] = set()

    # -- helpers ---------------------------------------------------------------------

    def _where(self, ref: str) -> str:
        path = str(self.sources[ref].path)
        return ref if path == ref or Path(path) == Path(ref) else f"{ref} ({path})"

    def _check_input(
        self,
        ref: str,
        name: str,
        out_name: str,
        want: tuple[tuple[int, ...], torch.dtype],
        want_from: str,
        rows_free: bool = False,
    ) -> None:
        src = self.sources[ref]
        if name not in src:
            raise MergeError(f"tensor {name!r} missing from model {self._where(ref)}")
        shape, dtype = tuple(src.shape(name)), src.dtype(name)
        same = shape[1:] == want[0][1:] and len(shape) > 0 if rows_free else shape == want[0]
        if not same:
            hint = ""
            if not rows_free and is_vocab_tensor(out_name) and shape[1:] == want[0][1:]:
                hint = (
                    " (the vocabularies differ: tokenizer_source: base or a model's path "
                    "realigns them)"
                )
            raise MergeError(
                f"tensor {out_name!r}: shape {list(shape)} in model {ref} differs from "
                f"{list(want[0])} in model {want_from}{hint}"
            )
        # float16 merges with float32 (computed in float32); a float with an int does not
        if dtype.is_floating_point != want[1].is_floating_point:
            raise MergeError(
                f"tensor {out_name!r}: dtype {str(dtype).removeprefix('torch.')} in model "
                f"{ref}, {str(want[1]).removeprefix('torch.')} in model {want_from}"
            )

    def _params(self, scopes: _Scope, name: str, t: float, per_model: bool) -> dict[str, Scalar]:
        chain = (
            (scopes.source, scopes.slice, scopes.glob) if per_model else (scopes.slice, scopes.glob)
        )
        return {
            p.name: _lookup(p.name, p.default, chain, name, t)
            for p in self.spec.params
            if p.per_model == per_model
        }

    def add(
        self,
        out_name: str,
        members: Sequence[tuple[str, str, Mapping[str, Any] | None]],
        slice_params: Mapping[str, Any] | None,
        t: float,
    ) -> None:
        """Plan one output tensor from ``(model ref, input name, source params)`` triples."""
        if out_name in self.seen:
            raise MergeError(f"tensor {out_name!r} would be written twice; check the slices")
        self.seen.add(out_name)
        glob = self.recipe.parameters
        base_ref = self.recipe.base_model
        lead = next((m for m in members if m[0] == base_ref), members[0])
        lead_src = self.sources[lead[0]]
        if lead[1] not in lead_src:
            raise MergeError(f"tensor {lead[1]!r} missing from model {self._where(lead[0])}")
        shape = tuple(lead_src.shape(lead[1]))
        src_dtype = lead_src.dtype(lead[1])
        vocab = self.vocab if self.vocab is not None and is_vocab_tensor(out_name) else None
        vocab = vocab if src_dtype.is_floating_point and len(shape) > 0 else None
        for ref, name, _ in members:
            self._check_input(ref, name, out_name, (shape, src_dtype), lead[0], vocab is not None)
        if vocab is not None:  # one row per output token
            shape = (vocab.rows, *shape[1:])
        floating = src_dtype.is_floating_point
        dtype = self.out_dtype if (self.out_dtype is not None and floating) else src_dtype
        compute = self.compute_dtype
        if compute is None:  # mergekit without dtype: the inputs' own (promoted) dtype
            compute = src_dtype
            for ref, name, _ in members:
                compute = torch.promote_types(compute, self.sources[ref].dtype(name))
        inputs = [
            TensorInput(ref, name, self._params(_Scope(p, slice_params, glob), out_name, t, True))
            for ref, name, p in members
        ]
        method_params = self._params(_Scope(None, slice_params, glob), out_name, t, False)
        spec = self.spec
        base: TensorInput | None = None
        others = inputs
        if spec.uses_base(base_ref):
            base = next((i for i in inputs if i.model == base_ref), None)
            if base is None:  # only an optional base can be missing: a slice without it
                raise MergeError(
                    f"tensor {out_name!r}: base_model {base_ref} is not among its sources "
                    f"(with a base_model, {spec.name} needs it in every slice)"
                )
            others = [i for i in inputs if i.model != base_ref]
        copy = not floating or spec.name == "passthrough"
        if not floating:  # integer buffers: taken from the base / first model as they are
            lead_input = next(i for i in inputs if i.model == lead[0])
            base, others = None, [lead_input]
        group = (
            _filter_entry(slice_params, glob, "split", out_name) if spec.name == "splitpoint" else 0
        )
        self.tensors.append(
            TensorPlan(
                out_name,
                shape,
                dtype,
                base,
                tuple(others),
                method_params,
                copy,
                group,
                compute,
                vocab,
            )
        )


def _filter_entry(
    slice_params: Mapping[str, Any] | None, glob: Mapping[str, Any] | None, key: str, name: str
) -> int:
    """Index of the filter entry of parameter ``key`` that applies to tensor ``name``.

    The innermost scope that sets ``key`` decides; 0 when its value is not a filter list.
    """
    for scope in (slice_params, glob):
        if scope and key in scope:
            value = scope[key]
            return (filter_entry(value, name) or 0) if is_filter_list(value) else 0
    return 0


def _model_layer_count(src: TensorSource) -> int:
    if src.config:
        n = num_layers(src.config)
        if n is not None:
            return n
    names = src.keys()
    indices = [i for i in (layer_index(k) for k in names) if i is not None]
    return max(indices) + 1 if indices else 0


def _layer_names(src: TensorSource) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    names = src.keys()
    for key in names:
        idx = layer_index(key)
        if idx is not None:
            out.setdefault(idx, []).append(key)
    return out


def module_order(names: Sequence[str], config: Mapping[str, Any] | None) -> list[str]:
    """``names`` in the order the model's module lists its tensors, where that is known.

    A checkpoint file lists tensors in its own order (safetensors: sorted by name), the
    module that loads it in its layer order; a ``splitpoint`` flattens model A in A's
    order, so both ways of merging — a file from disk here, the resident module in
    ``shoal evolve`` — must count the split in the module's. The order comes from an
    empty (meta-device) model built from ``config`` with ``transformers``; a config it
    does not know leaves the file order. Names the module lacks follow in file order.

    Known gaps (where ``shoal evolve``'s resident module may count otherwise): a model
    without a ``model_type`` (a ``callable`` loader's); a file that also lists a tied alias
    (``torch.save`` of a tied model), which the worker leaves out; checkpoints whose names
    differ from the module's (fused MoE experts).
    """
    if is_vlm_config(config):
        config = config["text_config"]  # a VLM seen through its language part (merge/vlm.py)
    if not config or "model_type" not in config:
        return list(names)
    try:
        import transformers

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # e.g. BERT's "use is_decoder=True"
        try:
            cfg = transformers.AutoConfig.for_model(**config)
            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(cfg)
        finally:
            transformers.logging.set_verbosity(verbosity)
    except Exception:  # an architecture this transformers does not know: keep the file order
        return list(names)
    present = set(names)
    ordered = [n for n in model.state_dict() if n in present]
    placed = set(ordered)
    return ordered + [n for n in names if n not in placed]


def _reference(recipe: Recipe) -> str:
    if recipe.merge_method == "splitpoint" and recipe.models:
        return recipe.models[0].model  # model A fixes the flattening order
    if recipe.base_model:
        return recipe.base_model
    if recipe.models:
        return recipe.models[0].model
    assert recipe.slices
    return recipe.slices[0].sources[0].model


def _plan_models(planner: _Planner, recipe: Recipe, ref: str) -> None:
    assert recipe.models is not None
    src = planner.sources[ref]
    n = _model_layer_count(src)
    members_spec = [(m.model, m.parameters) for m in recipe.models]
    spec = planner.spec
    listed = [m for m, _ in members_spec]
    if recipe.base_model and recipe.base_model not in listed:
        if spec.uses_base(recipe.base_model):
            members_spec.insert(0, (recipe.base_model, None))
        elif spec.base_as_model:  # one more model, after the listed ones (as mergekit)
            members_spec.append((recipe.base_model, None))
    names = src.keys()
    if recipe.merge_method == "splitpoint":  # the split index counts in this order
        names = module_order(names, src.config)
    for name in names:
        li = layer_index(name)
        t = position(name, li, n)
        planner.add(name, [(m, name, p) for m, p in members_spec], None, t)


def _plan_slices(planner: _Planner, recipe: Recipe, ref: str) -> tuple[int, list[int]]:
    assert recipe.slices is not None
    slices = recipe.slices
    ref_src = planner.sources[ref]
    ref_names = ref_src.keys()
    non_layer = [k for k in ref_names if layer_index(k) is None]
    pre = [k for k in non_layer if is_pre_tensor(k)]
    post = [k for k in non_layer if not is_pre_tensor(k)]
    by_model = {
        s.model: _layer_names(planner.sources[s.model]) for sl in slices for s in sl.sources
    }

    def members(sl_index: int, name_of: Any) -> list[tuple[str, str, Mapping[str, Any] | None]]:
        return [(s.model, name_of(s), s.parameters) for s in slices[sl_index].sources]

    for name in pre:
        planner.add(name, members(0, lambda s, n=name: n), slices[0].parameters, 0.0)
    out_layer = 0
    layer_sources: list[int] = []
    for i, sl in enumerate(slices):
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for j, s in enumerate(sl.sources):
            have = len(by_model[s.model])
            if s.layer_range[1] > have:
                raise MergeError(
                    f"slices[{i}].sources[{j}].layer_range {list(s.layer_range)} exceeds the "
                    f"{have} layers of model {s.model}"
                )
        for offset in range(length):
            t = 1.0 if length <= 1 else offset / (length - 1)
            lead = sl.sources[0]
            for name in by_model[lead.model][lead.layer_range[0] + offset]:
                out_name = rename_layer(name, out_layer)
                planner.add(
                    out_name,
                    members(i, lambda s, n=name, o=offset: rename_layer(n, s.layer_range[0] + o)),
                    sl.parameters,
                    t,
                )
            layer_sources.append(lead.layer_range[0] + offset)
            out_layer += 1
    last = len(slices) - 1
    for name in post:
        # t = 0 like every non-layer tensor: mergekit's planner reads them all at t = 0
        planner.add(name, members(last, lambda s, n=name: n), slices[last].parameters, 0.0)
    return out_layer, layer_sources


def build_plan(
    recipe: Recipe,
    sources: Mapping[str, TensorSource],
    *,
    dtype: str | None = None,
    float32_compute: bool = False,
    vocab: OutputVocabulary | None = None,
) -> MergePlan:
    """Plan a merge from the sources' metadata (no tensor data is read).

    The compute dtype follows mergekit: the recipe's ``dtype``, else the inputs' dtype
    (promoted when they differ). The output dtype is ``dtype`` here, else the recipe's
    ``out_dtype``, else its ``dtype``, else the inputs'.

    Args:
        recipe: a validated recipe.
        sources: a source per model reference (see :func:`~shoal.merge.sources.open_sources`).
        dtype: output dtype overriding the recipe's ``out_dtype`` / ``dtype``.
        float32_compute: compute in float32 whatever the recipe's ``dtype`` (a departure
            from mergekit: low-precision recipes then give slightly different tensors).
        vocab: the output vocabulary (:func:`~shoal.merge.vocab.build_vocabulary`); the
            embedding and head tensors then get one row per output token, each model's
            rows realigned to it as the tensor is merged.

    Returns:
        The plan.

    Raises:
        MergeError: a tensor is missing from a model, shapes differ, a layer range
            exceeds a model.
        RecipeError: a required parameter has no value for some tensor.
    """
    out_dtype = torch_dtype(dtype or recipe.output_dtype())
    compute = torch.float32 if float32_compute else torch_dtype(recipe.dtype)
    planner = _Planner(recipe, sources, out_dtype, compute, vocab)
    ref = _reference(recipe)
    from shoal.merge.vlm import finish_vlm_plan  # language parts back into their VLM

    if recipe.models is not None:
        _plan_models(planner, recipe, ref)
        plan = MergePlan(recipe.merge_method, planner.tensors, ref, vocab=vocab)
        return finish_vlm_plan(plan, recipe, sources)
    n_out, layer_sources = _plan_slices(planner, recipe, ref)
    plan = MergePlan(recipe.merge_method, planner.tensors, ref, n_out, layer_sources, vocab)
    return finish_vlm_plan(plan, recipe, sources)
