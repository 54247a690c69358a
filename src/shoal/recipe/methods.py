"""The registry of merge methods: names, the parameters each knows, their defaults.

One table, shared by recipe validation, ``shoal merge --help`` and the tests.
Defaults follow mergekit for the methods mergekit has (METHODS.md §1, "one recipe
file, one model"): ``linear`` and ``ties`` normalise by the weights,
``task_arithmetic``, the DARE and the breadcrumbs methods do not; DARE's
``rescale`` defaults to mergekit's L1-preserving form (``l1``), the paper's 1/density
form is ``rescale: inverse_density`` (equal in expectation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ParamKind = Literal["float", "bool", "choice"]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a method understands.

    Attributes:
        name: the key in the recipe (``weight``, ``density``, ...).
        kind: ``float`` (scalar, gradient list or filter list allowed), ``bool`` or
            ``choice`` (one of ``choices``).
        default: value used when no scope gives one; ``None`` means required.
        per_model: whether it may be given per model / per slice source (mergekit's
            "tensor parameters"); global-only otherwise (still allowed per slice).
        lo: inclusive lower bound for floats, or ``None``.
        hi: inclusive upper bound for floats, or ``None``.
        choices: allowed strings for ``choice`` (``bool`` accepted where mapped).
        help: one line for docs and ``--help``.
    """

    name: str
    kind: ParamKind
    default: float | bool | str | None
    per_model: bool
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    help: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """What a merge method needs and which parameters it knows.

    Attributes:
        name: registry key, also the ``merge_method`` value.
        help: one line.
        needs_base: a ``base_model`` is required.
        min_models: fewest models besides the base.
        max_models: most models besides the base (``None``: any).
        params: the parameters it understands.
        base_is_input: the base counts as one of the interpolated models (slerp).
        optional_base: without ``needs_base``: a ``base_model``, when the recipe names
            one, is the method's origin (its task vectors are taken from it), and the
            method also runs without one (mergekit's optional base: multislerp, nuslerp).
        base_as_model: a ``base_model`` is merged as one more model, added after the
            listed ones when ``models:`` does not name it (mergekit adds it so for a
            method that ignores the base: karcher).
    """

    name: str
    help: str
    needs_base: bool
    min_models: int
    max_models: int | None
    params: tuple[ParamSpec, ...]
    base_is_input: bool = False
    optional_base: bool = False
    base_as_model: bool = False

    def param(self, name: str) -> ParamSpec | None:
        """The spec of parameter ``name``, or ``None`` when unknown."""
        for spec in self.params:
            if spec.name == name:
                return spec
        return None

    def uses_base(self, base_model: str | None) -> bool:
        """Whether a recipe's ``base_model`` is this method's origin, kept apart from the
        models merged: always for ``needs_base``, when one is given for ``optional_base``."""
        return self.needs_base or (self.optional_base and base_model is not None)

    @property
    def param_names(self) -> tuple[str, ...]:
        """All parameter names, in declaration order."""
        return tuple(p.name for p in self.params)


def _weight() -> ParamSpec:
    return ParamSpec("weight", "float", 1.0, True, help="weight of the model (or its task vector)")


def _density() -> ParamSpec:
    return ParamSpec(
        "density", "float", 1.0, True, 0.0, 1.0, help="fraction of task-vector entries kept"
    )


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec("normalize", "bool", default, False, help="divide by the sum of weights")


def _lambda() -> ParamSpec:
    return ParamSpec("lambda", "float", 1.0, False, help="scale of the merged task vector")


def _int8_mask() -> ParamSpec:
    # mergekit's memory option; accepted so existing recipes load, it changes nothing here
    return ParamSpec("int8_mask", "bool", False, False, help="accepted for mergekit; no effect")


def _majority() -> ParamSpec:
    return ParamSpec(
        "majority",
        "choice",
        "sum",
        False,
        choices=("sum", "count"),
        help="TIES sign election: by weighted sum (paper) or by count",
    )


def _rescale() -> ParamSpec:
    return ParamSpec(
        "rescale",
        "choice",
        "l1",
        False,
        choices=("l1", "inverse_density", "none"),
        help="DARE rescale: l1 (mergekit, default), inverse_density (paper), none; "
        "true = l1, false = none",
    )


_TA = (_weight(), _lambda(), _normalize(False), _int8_mask())
_TIES = (_weight(), _density(), _lambda(), _normalize(True), _majority(), _int8_mask())
_DARE = (_weight(), _density(), _lambda(), _normalize(False), _rescale(), _int8_mask())
_GAMMA = ParamSpec(
    "gamma", "float", 0.01, True, 0.0, 1.0, help="fraction of largest-magnitude entries dropped"
)
_BREAD = (_weight(), _density(), _GAMMA, _lambda(), _normalize(False), _int8_mask())
_EPSILON = ParamSpec(
    "epsilon",
    "float",
    0.15,
    True,
    0.0,
    0.5,
    help="DELLA: keep probabilities run from density - epsilon to density + epsilon by "
    "magnitude rank",
)


def _della(normalize: bool) -> tuple[ParamSpec, ...]:
    return (
        _weight(),
        _density(),
        _EPSILON,
        _lambda(),
        _normalize(normalize),
        _rescale(),
        _int8_mask(),
    )


_SELECT_TOPK = ParamSpec(
    "select_topk",
    "float",
    1.0,
    False,
    0.0,
    1.0,
    help="fraction of entries kept, those of largest variance across the task vectors",
)

METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in (
        MethodSpec(
            "linear",
            "weighted average of the models",
            False,
            1,
            None,
            (_weight(), _normalize(True)),
        ),
        MethodSpec(
            "task_arithmetic",
            "base + lambda * sum of weighted task vectors",
            True,
            1,
            None,
            _TA,
        ),
        MethodSpec(
            "ties",
            "TIES: trim task vectors, elect signs, merge agreeing entries",
            True,
            1,
            None,
            _TIES,
        ),
        MethodSpec(
            "dare_ties",
            "DARE random drop and rescale, then TIES sign election",
            True,
            1,
            None,
            _DARE,
        ),
        MethodSpec(
            "dare_linear",
            "DARE random drop and rescale, then task arithmetic",
            True,
            1,
            None,
            _DARE,
        ),
        MethodSpec(
            "breadcrumbs",
            "drop largest (gamma) and smallest entries down to density, then task arithmetic",
            True,
            1,
            None,
            _BREAD,
        ),
        MethodSpec(
            "breadcrumbs_ties",
            "breadcrumbs sparsification with TIES sign election",
            True,
            1,
            None,
            _BREAD,
        ),
        MethodSpec(
            "della",
            "DELLA: drop entries with probabilities ranked by magnitude, rescale, then TIES "
            "sign election",
            True,
            1,
            None,
            _della(True),
        ),
        MethodSpec(
            "della_linear",
            "DELLA drops and rescale, then task arithmetic",
            True,
            1,
            None,
            _della(False),
        ),
        MethodSpec(
            "karcher",
            "Karcher mean: the models' mean direction on the unit sphere times their mean "
            "norm; a base_model is one more model",
            False,
            1,
            None,
            (
                ParamSpec(
                    "max_iter",
                    "float",
                    10,
                    False,
                    0.0,
                    math.inf,
                    help="most iterations of the Riemannian mean (a whole number)",
                ),
                ParamSpec(
                    "tol",
                    "float",
                    1e-5,
                    False,
                    0.0,
                    math.inf,
                    help="threshold on norms, angles and the tangent step",
                ),
            ),
            base_as_model=True,
        ),
        MethodSpec(
            "multislerp",
            "Multi-SLERP: weighted barycentre of the models (or, with a base_model, of "
            "their task vectors) on the hypersphere",
            False,
            1,
            None,
            (
                _weight(),
                ParamSpec(
                    "normalize_weights",
                    "bool",
                    True,
                    False,
                    help="divide the weights by their sum",
                ),
                ParamSpec(
                    "eps",
                    "float",
                    1e-8,
                    False,
                    0.0,
                    math.inf,
                    help="guard of the norms; directions summing below it are degenerate",
                ),
            ),
            optional_base=True,
        ),
        MethodSpec(
            "nuslerp",
            "NuSLERP: SLERP of two models (or of their task vectors, given a base_model) at "
            "t = w2 / (w1 + w2), whole tensors or row by row",
            False,
            2,
            2,
            (
                _weight(),
                ParamSpec(
                    "nuslerp_row_wise",
                    "bool",
                    False,
                    False,
                    help="without nuslerp_flatten: interpolate the columns (dimension 0 "
                    "slices), not the rows",
                ),
                ParamSpec(
                    "nuslerp_flatten",
                    "bool",
                    True,
                    False,
                    help="interpolate each tensor as one flat vector (default)",
                ),
            ),
            optional_base=True,
        ),
        MethodSpec(
            "nearswap",
            "NearSwap: take the other model's value where it lies within t of the base's",
            True,
            1,
            1,
            (
                ParamSpec(
                    "t",
                    "float",
                    None,
                    False,
                    0.0,
                    math.inf,
                    help="distance up to which the other model's value is taken whole",
                ),
            ),
        ),
        MethodSpec(
            "sce",
            "SCE: keep high-variance entries, weigh task vectors by their energy, erase "
            "minority signs",
            True,
            1,
            None,
            (_SELECT_TOPK, _int8_mask()),
        ),
        MethodSpec(
            "slerp",
            "spherical interpolation of two models; t=0 is the base model",
            True,
            1,
            1,
            (ParamSpec("t", "float", None, False, 0.0, 1.0, help="interpolation factor"),),
            base_is_input=True,
        ),
        MethodSpec(
            "model_stock",
            "Model Stock: average of fine-tunes pulled toward the base by their angle",
            True,
            2,
            None,
            (
                ParamSpec(
                    "filter_wise",
                    "bool",
                    False,
                    False,
                    help="one angle per row (output filter) instead of one per tensor",
                ),
            ),
        ),
        MethodSpec(
            "arcee_fusion",
            "Arcee Fusion: take the other model's changes whose importance (change x KL of "
            "the row's softmax) is an outlier",
            True,
            1,
            1,
            (),
        ),
        MethodSpec(
            "passthrough",
            "copy tensors unchanged; with slices, stack layers (frankenmerge)",
            False,
            1,
            1,
            (ParamSpec("scale", "float", 1.0, True, help="multiply the copied tensor"),),
        ),
        MethodSpec(
            "splitpoint",
            "M2N2 split-point crossover of models A and B (shoal extension)",
            False,
            2,
            2,
            (
                ParamSpec(
                    "split",
                    "float",
                    None,
                    False,
                    0.0,
                    1.0,
                    help="split position as a fraction of A's flattened parameters (w_s)",
                ),
                ParamSpec(
                    "ratio",
                    "float",
                    0.5,
                    False,
                    0.0,
                    1.0,
                    help="mixing ratio w_m: t before the split, 1 - t after",
                ),
                ParamSpec(
                    "angle",
                    "choice",
                    "segment",
                    False,
                    choices=("segment", "global"),
                    help="SLERP angle per segment (default) or one over the whole vector "
                    "(M2N2 reference code)",
                ),
            ),
        ),
    )
}

# methods whose per-tensor randomness matters (need the seeded generator)
RANDOM_METHODS = frozenset({"dare_ties", "dare_linear", "della", "della_linear"})


def method_spec(name: str) -> MethodSpec | None:
    """Look a method up by name; ``None`` when unknown."""
    return METHODS.get(name)
