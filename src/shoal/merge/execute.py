"""Run a merge plan one tensor at a time.

Each output tensor is computed from lazily read inputs, checked for NaN/Inf before and
after the cast to its output dtype (unless allowed), and yielded; memory stays at the
inputs and output of one tensor. Every tensor gets its own ``torch.Generator`` seeded
from ``(seed, sha256(tensor name))``, so results do not depend on order or threads.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping

import torch

from shoal._progress import counting_bar
from shoal.checkpoint import check_finite
from shoal.errors import CheckpointError, MergeError
from shoal.merge.methods import SplitContext, apply_method
from shoal.merge.plan import MergePlan, TensorPlan
from shoal.merge.sources import TensorSource


def tensor_seed(seed: int, name: str) -> int:
    """The 63-bit seed of one tensor's generator: from the run seed and the tensor name."""
    digest = hashlib.sha256(f"{int(seed)}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _surely_finite(tensor: torch.Tensor) -> bool:
    """Fast check: NaN propagates through min/max and ±inf shows in them.

    One fused reduction, no mask allocated — about 15x faster than ``isfinite().all()``;
    only when it fails does :func:`~shoal.checkpoint.check_finite` count the bad entries.
    """
    if not tensor.is_floating_point():
        return True
    if tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _read(
    sources: Mapping[str, TensorSource],
    model: str,
    name: str,
    device: str | torch.device,
    allow_nonfinite: bool,
) -> torch.Tensor:
    src = sources[model]
    tensor = src.get(name, device=device)
    if not allow_nonfinite and not _surely_finite(tensor):
        try:
            file_of = getattr(src, "file_of", None)
            check_finite(tensor, name=name, source=file_of(name) if file_of else src.path)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} (pass --allow-nonfinite to merge anyway)") from None
    return tensor


def read_inputs(
    tp: TensorPlan,
    sources: Mapping[str, TensorSource],
    device: str | torch.device,
    allow_nonfinite: bool,
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """The base tensor (or ``None``) and the other inputs of one output tensor.

    For an embedding / head tensor with an output vocabulary, each is cast to the compute
    dtype and its rows realigned to the output tokens (:mod:`shoal.merge.vocab`).
    """
    base = _read(sources, tp.base.model, tp.base.name, device, allow_nonfinite) if tp.base else None
    tensors = [_read(sources, i.model, i.name, device, allow_nonfinite) for i in tp.inputs]
    if tp.vocab is None:
        return base, tensors
    members = [(i.model, t.to(tp.compute_dtype)) for i, t in zip(tp.inputs, tensors, strict=True)]
    if tp.base is not None and base is not None:
        members.insert(0, (tp.base.model, base.to(tp.compute_dtype)))
    realigned = tp.vocab.realign(tp.name, members)
    if tp.base is not None:
        return realigned[0], realigned[1:]
    return None, realigned


def _split_contexts(
    plan: MergePlan,
    sources: Mapping[str, TensorSource],
    device: str | torch.device,
    allow_nonfinite: bool,
) -> dict[str, SplitContext]:
    """Local split index and SLERP angles of every merged tensor (METHODS.md §1 splitpoint).

    A chromosome is the set of merged tensors to which the same entry of a ``split``
    filter list applies (M2N2 writes one entry per chromosome); without a filter list
    the whole model is one. Its flat vector is its floating-point tensors of model A in
    A's key order; its split index is ``round(split · length)``.
    """
    chromosomes: dict[int, list[TensorPlan]] = {}
    for tp in plan.tensors:
        if not tp.copy:
            chromosomes.setdefault(tp.group, []).append(tp)
    contexts: dict[str, SplitContext] = {}
    for members in chromosomes.values():
        contexts.update(_chromosome_contexts(members, sources, device, allow_nonfinite))
    return contexts


def _chromosome_contexts(
    members: list[TensorPlan],
    sources: Mapping[str, TensorSource],
    device: str | torch.device,
    allow_nonfinite: bool,
) -> dict[str, SplitContext]:
    """Split contexts of one chromosome: one pass over A and B accumulates the dot
    products and norms of the global angle or of the two segment angles."""
    total = sum(math.prod(tp.shape) for tp in members)
    params = members[0].params
    split_at = round(float(params["split"]) * total)
    angle = str(params["angle"])
    # [dot, |a|², |b|²] before and after the split
    sums = torch.zeros(2, 3, dtype=torch.float64)
    offsets: dict[str, int] = {}
    offset = 0
    for tp in members:
        offsets[tp.name] = offset
        _, (a, b) = read_inputs(tp, sources, device, allow_nonfinite)
        a, b = a.reshape(-1).double(), b.reshape(-1).double()
        local = max(0, min(split_at - offset, a.numel()))
        for part, sl in ((0, slice(0, local)), (1, slice(local, None))):
            x, y = a[sl], b[sl]
            sums[part] += torch.stack([(x * y).sum(), (x * x).sum(), (y * y).sum()]).cpu()
        offset += a.numel()

    def cos(dot: float, na: float, nb: float) -> float:
        den = math.sqrt(na * nb)
        return 1.0 if den == 0.0 else max(-1.0, min(1.0, dot / den))

    whole = sums.sum(0)
    c_all = cos(*whole.tolist())
    c_before, c_after = cos(*sums[0].tolist()), cos(*sums[1].tolist())
    if angle == "global":
        c_before = c_after = c_all
    return {name: SplitContext(split_at - off, c_before, c_after) for name, off in offsets.items()}


def merged_tensor(
    plan: MergePlan,
    tp: TensorPlan,
    sources: Mapping[str, TensorSource],
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    allow_nonfinite: bool = False,
    split: SplitContext | None = None,
) -> torch.Tensor:
    """Compute one output tensor of ``plan``, cast to its output dtype."""
    base, tensors = read_inputs(tp, sources, device, allow_nonfinite)
    generator = torch.Generator(device=device)
    generator.manual_seed(tensor_seed(seed, tp.name))
    try:
        out = apply_method(plan.method, tp, base, tensors, generator, split)
    except MergeError as exc:  # an operator knows the numbers, not the tensor
        raise MergeError(f"tensor {tp.name!r}: {exc}") from None
    out = out.to(tp.dtype)
    if not allow_nonfinite and not _surely_finite(out):
        _refuse_nonfinite_output(out, tp)
    return out


def _refuse_nonfinite_output(out: torch.Tensor, tp: TensorPlan) -> None:
    """The writer checks what it writes as the reader checks what it reads: finite inputs
    can still give inf (a large weight, or a value beyond float16's 65504 after the cast)."""
    try:
        check_finite(out, name=tp.name, source="merged output")
    except CheckpointError as exc:
        dtype = str(tp.dtype).removeprefix("torch.")
        raise MergeError(
            f"{exc} as {dtype}; nothing was written (pass --allow-nonfinite to write it anyway)"
        ) from None


def iter_merged(
    plan: MergePlan,
    sources: Mapping[str, TensorSource],
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    allow_nonfinite: bool = False,
    progress: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every output tensor, in plan order.

    Args:
        plan: from :func:`~shoal.merge.plan.build_plan`.
        sources: the plan's model references → sources.
        device: where to compute (``"cpu"``, ``"cuda"``).
        seed: run seed (DARE's random drops).
        allow_nonfinite: skip the NaN/Inf checks of the inputs and outputs.
        progress: show a rich progress bar on stderr.

    Raises:
        CheckpointError: an input holds NaN/Inf (unless allowed) or cannot be read.
        MergeError: an output tensor holds NaN/Inf (unless allowed).
    """
    splits: dict[str, SplitContext] = {}
    if plan.method == "splitpoint":
        splits = _split_contexts(plan, sources, device, allow_nonfinite)
    bar = counting_bar(progress)
    with bar, torch.no_grad():
        task = bar.add_task(f"merging ({plan.method})", total=len(plan.tensors)) if progress else 0
        for tp in plan.tensors:
            yield (
                tp.name,
                merged_tensor(
                    plan,
                    tp,
                    sources,
                    device=device,
                    seed=seed,
                    allow_nonfinite=allow_nonfinite,
                    split=splits.get(tp.name),
                ),
            )
            if progress:
                bar.advance(task)
