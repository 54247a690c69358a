"""One output tensor from its input tensors: the recipe method → :mod:`shoal.ops` call.

The compute dtype is the plan's (mergekit's meaning of a recipe's ``dtype``): the
task-vector methods (task arithmetic, TIES, DARE, breadcrumbs, DELLA, SCE), NearSwap,
Multi-SLERP, NuSLERP and Arcee Fusion run every step in it, as mergekit's do; Karcher
keeps its vectors in it and its norms in float32; linear, SLERP, Model Stock and
splitpoint compute in float32 and round to it (mergekit's linear and SLERP do the same).
The caller casts to the output dtype.
``lambda`` scales the merged task vector (mergekit's global ``lambda``) before the base
is added: θ = θ_base + λ·merged delta.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from shoal.errors import MergeError
from shoal.merge.plan import TensorPlan
from shoal.ops.arcee_fusion import arcee_fusion
from shoal.ops.breadcrumbs import breadcrumbs
from shoal.ops.dare import dare
from shoal.ops.della import della
from shoal.ops.karcher import karcher
from shoal.ops.linear import linear
from shoal.ops.model_stock import model_stock
from shoal.ops.multislerp import multislerp
from shoal.ops.nearswap import nearswap
from shoal.ops.nuslerp import nuslerp_merge
from shoal.ops.sce import sce
from shoal.ops.slerp import slerp
from shoal.ops.splitpoint import splitpoint
from shoal.ops.task_arithmetic import task_arithmetic
from shoal.ops.ties import ties

# mergekit's SLERP falls back to linear interpolation when |cos| exceeds this
MERGEKIT_DOT_THRESHOLD = 0.9995


@dataclass(frozen=True)
class SplitContext:
    """Where one tensor sits in the flattened model vector (splitpoint only).

    Attributes:
        split: split index local to this tensor.
        cos_before: cos Ω used before the split (global or segment angle).
        cos_after: cos Ω used after the split.
    """

    split: int
    cos_before: float
    cos_after: float


def _per_input(tp: TensorPlan, key: str) -> list[float]:
    return [float(cast(float, i.params[key])) for i in tp.inputs]


def _whole(params: dict[str, Any], key: str) -> int:
    """A parameter that counts something, checked to be a whole number."""
    value = float(params[key])
    if not value.is_integer():
        raise MergeError(f"{key} must be a whole number, got {value:g}")
    return int(value)


def apply_method(
    method: str,
    tp: TensorPlan,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    generator: torch.Generator,
    split: SplitContext | None = None,
) -> torch.Tensor:
    """Compute one merged tensor.

    Args:
        method: the recipe's merge method.
        tp: the tensor's plan (resolved parameters).
        base: the base model's tensor, ``None`` for methods without a base.
        tensors: the other inputs' tensors, in ``tp.inputs`` order.
        generator: seeded source of randomness for this tensor (DARE).
        split: position in the flat vector (splitpoint).

    Returns:
        The merged tensor in the plan's compute dtype (a non-float copy keeps its dtype).
    """
    cd = tp.compute_dtype
    if tp.copy:
        src = base if base is not None else tensors[0]
        if not src.is_floating_point():
            return src
        scale = float(tp.inputs[0].params.get("scale", 1.0)) if tp.inputs else 1.0
        src = src.to(cd)
        return src if scale == 1.0 else src * scale
    # mergekit casts every input to its compute dtype as it loads it
    base = None if base is None else base.to(cd)
    tensors = [t.to(cd) for t in tensors]
    return _merged(method, tp, base, tensors, generator, split).to(cd)


def _merged(
    method: str,
    tp: TensorPlan,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    generator: torch.Generator,
    split: SplitContext | None,
) -> torch.Tensor:
    p: dict[str, Any] = dict(tp.params)
    cd = tp.compute_dtype
    if method == "linear":
        return linear(tensors, _per_input(tp, "weight"), normalize=bool(p["normalize"]))
    if method == "karcher":  # a base_model is among the inputs (the plan puts it there)
        return karcher(tensors, max_iter=_whole(p, "max_iter"), tol=float(p["tol"]), dtype=cd)
    if method == "multislerp":  # the base is optional
        return multislerp(
            tensors,
            _per_input(tp, "weight"),
            base,
            normalize_weights=bool(p["normalize_weights"]),
            eps=float(p["eps"]),
            dtype=cd,
        )
    if method == "nuslerp":  # the base is optional
        return nuslerp_merge(
            tensors,
            _per_input(tp, "weight"),
            base,
            row_wise=bool(p["nuslerp_row_wise"]),
            flatten=bool(p["nuslerp_flatten"]),
            dtype=cd,
        )
    assert base is not None or method == "splitpoint"
    if method == "splitpoint":
        assert split is not None
        return splitpoint(
            tensors[0],
            tensors[1],
            split=split.split,
            ratio=float(p["ratio"]),
            cos_before=split.cos_before,
            cos_after=split.cos_after,
        )
    assert base is not None
    if method == "slerp":
        return slerp(base, tensors[0], float(p["t"]), dot_threshold=MERGEKIT_DOT_THRESHOLD)
    if method == "model_stock":
        return model_stock(base, tensors, filter_wise=bool(p["filter_wise"]))
    if method == "arcee_fusion":
        return arcee_fusion(base, tensors[0], dtype=cd)
    if method == "nearswap":
        return nearswap(base, tensors[0], float(p["t"]), dtype=cd)
    if method == "sce":
        return sce(base, tensors, select_topk=float(p["select_topk"]), dtype=cd)
    weights = _per_input(tp, "weight")
    lam = float(p["lambda"])
    normalize = bool(p["normalize"])
    if method == "task_arithmetic":
        return task_arithmetic(base, tensors, weights, lam=lam, normalize=normalize, dtype=cd)
    densities = _per_input(tp, "density")
    if method == "ties":
        return ties(
            base,
            tensors,
            weights,
            densities,
            normalize=normalize,
            majority=p["majority"],
            lam=lam,
            dtype=cd,
        )
    if method in ("dare_ties", "dare_linear"):
        return dare(
            base,
            tensors,
            weights,
            densities,
            generator,
            consensus="ties" if method == "dare_ties" else "none",
            rescale=p["rescale"],
            normalize=normalize,
            lam=lam,
            dtype=cd,
        )
    if method in ("della", "della_linear"):
        return della(
            base,
            tensors,
            weights,
            densities,
            _per_input(tp, "epsilon"),
            generator,
            consensus="ties" if method == "della" else "none",
            rescale=p["rescale"],
            normalize=normalize,
            lam=lam,
            dtype=cd,
        )
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        return breadcrumbs(
            base,
            tensors,
            weights,
            densities,
            _per_input(tp, "gamma"),
            consensus="ties" if method == "breadcrumbs_ties" else "none",
            normalize=normalize,
            lam=lam,
            dtype=cd,
        )
    # pragma: no cover - the registry and this table are tested together
    raise AssertionError(f"no implementation for merge method {method!r}")
