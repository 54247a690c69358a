"""M2N2's split-point crossover h(θ_A, θ_B, w_m, w_s) (Abrantes et al., 2025) — METHODS.md §1/§3.

The model is one flat vector in a fixed parameter order; entries before the split
index w_s are SLERPed with t = w_m, entries after it with t = 1 − w_m.
``angle="global"`` takes one angle over the whole vector (the reference code);
``angle="segment"`` takes one angle per side of the split.
"""

from __future__ import annotations

from typing import Literal

import torch

from shoal.errors import MergeError
from shoal.ops._common import f32
from shoal.ops.slerp import cosine, slerp_weights

Angle = Literal["global", "segment"]


def splitpoint(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    split: int,
    ratio: float,
    cos_before: float | None = None,
    cos_after: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Split-point crossover of one tensor that is a slice of the flat model vector.

    Args:
        a: parent A's tensor.
        b: parent B's tensor, same shape.
        split: the split index relative to this tensor's first (flattened) entry;
            ≤ 0 puts everything after the split, ≥ numel everything before.
        ratio: w_m; before the split t = ratio, after it t = 1 − ratio (t = 0 is A).
        cos_before: cos Ω used for the entries before the split (e.g. the global or
            whole-segment angle computed by the caller); ``None``: the angle between
            ``a`` and ``b`` over this whole tensor.
        cos_after: the same for the entries after the split.
        out: contiguous float32 tensor of ``a``'s size to write the result into (e.g. the
            resident model's parameters), not overlapping ``a`` or ``b``; ``None``: a new one.

    Returns:
        float32 tensor of the common shape (``out`` when given).
    """
    if a.shape != b.shape:
        raise MergeError(f"splitpoint: shape mismatch {list(a.shape)} vs {list(b.shape)}")
    fa, fb = f32(a).reshape(-1), f32(b).reshape(-1)
    n = fa.numel()
    s = max(0, min(int(split), n))
    own = cosine(fa, fb) if (cos_before is None or cos_after is None) else 0.0
    cb = own if cos_before is None else cos_before
    ca = own if cos_after is None else cos_after
    # slerp() of each side with its angle, written into one output (M2N2 runs this once per
    # child, where the temporaries and a cat would cost more than the maths)
    if out is not None and (out.numel() != n or out.dtype != torch.float32):
        raise MergeError(f"splitpoint: out= holds {out.numel()} {out.dtype}, needs {n} float32")
    flat = torch.empty_like(fa) if out is None else out.view(-1)
    for lo, hi, t, c in ((0, s, ratio, cb), (s, n, 1.0 - ratio, ca)):
        if lo < hi:
            wa, wb = slerp_weights(t, c)
            torch.mul(fa[lo:hi], wa, out=flat[lo:hi]).add_(fb[lo:hi] * wb)
    return flat.view(a.shape)


def splitpoint_cosines(
    a: torch.Tensor, b: torch.Tensor, split: int, angle: Angle
) -> tuple[float, float]:
    """cos Ω for the entries before and after index ``split`` of two flat vectors: one
    angle over the whole vectors (``"global"``) or one per side (``"segment"``). Pass
    float64 vectors to take the angles without a copy (see :func:`cosine`)."""
    if angle == "global":
        whole = cosine(a, b)
        return whole, whole
    return cosine(a[:split], b[:split]), cosine(a[split:], b[split:])


def splitpoint_flat(
    a_vec: torch.Tensor,
    b_vec: torch.Tensor,
    split: int,
    ratio: float,
    angle: Angle = "global",
    out: torch.Tensor | None = None,
    f64: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Reference split-point crossover of two whole flat parameter vectors.

    Args:
        a_vec: parent A, 1-D.
        b_vec: parent B, 1-D.
        split: w_s, index into the vector.
        ratio: w_m.
        angle: ``"global"`` (one angle over the vectors) or ``"segment"`` (one per side).
        out: 1-D float32 tensor to write the child into; ``None``: a new one.
        f64: the parents in float64, when the caller keeps such copies (the angles are
            taken in float64; without them each parent is converted here).

    Returns:
        float32 1-D tensor (``out`` when given).
    """
    if a_vec.ndim != 1 or a_vec.shape != b_vec.shape:
        raise MergeError("splitpoint_flat: expects two 1-D vectors of equal length")
    if angle not in ("global", "segment"):
        raise MergeError(f"unknown splitpoint angle {angle!r} (expected 'global' or 'segment')")
    a, b = f32(a_vec), f32(b_vec)
    n = a.numel()
    s = max(0, min(int(split), n))
    a64, b64 = f64 if f64 is not None else (a.to(torch.float64), b.to(torch.float64))
    cos_before, cos_after = splitpoint_cosines(a64, b64, s, angle)
    return splitpoint(
        a, b, split=s, ratio=ratio, cos_before=cos_before, cos_after=cos_after, out=out
    )
