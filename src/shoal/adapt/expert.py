"""Expert files: the z vectors of one SVF skill, and mixing experts (METHODS.md §5).

An expert is one small safetensors file: a tensor ``z.<module name>`` (fp32, one number
per singular value) per adapted matrix, and string metadata:

=================  ==========================================================
``format``         ``shoal-svf-expert`` (``format_version`` ``1``)
``base``           :func:`~shoal.adapt.svd_cache.matrix_fingerprint` of the base
                   matrices the z vectors were trained on
``matrices``       JSON object, matrix name → z length, in the wrapper's order
``skill``          the skill's name (``math``, ``code``, …)
``shoal_version``  the version that wrote the file
=================  ==========================================================

plus any other string fields the caller passes.

An expert loads only onto the base it was trained on (same fingerprint). With
``allow_transfer=True`` the fingerprint may differ — the transfer rule is that the
expert must name exactly the target's adapted matrices, each with the same z length
(hence the same min(m, n)); the singular directions are then the target's own, so z
means "scale the target's i-th singular value", which is what the paper's cross-model
transfer does.

:func:`mix_z` is the few-shot mixture z′ = Σ_k α_k z_k of METHODS.md §5, per model or per
matrix.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from shoal._atomic import atomic_path
from shoal.adapt.svf import AdaptError
from shoal.errors import CheckpointError, OutputExistsError, first_line

if TYPE_CHECKING:  # pragma: no cover
    from shoal.adapt.svf import SVFModel

__all__ = ["Expert", "load_expert", "mix_z", "read_expert", "save_expert"]

EXPERT_FORMAT = "shoal-svf-expert"
EXPERT_FORMAT_VERSION = "1"
# metadata keys the file format owns (the caller passes the base as "base_fingerprint")
_RESERVED = {"format", "format_version", "matrices", "shoal_version", "base"}
_PREFIX = "z."


@dataclass(frozen=True)
class Expert:
    """The contents of an expert file.

    Attributes:
        z: Module name → ``(r,)`` fp32 vector, in file order.
        base_fingerprint: Fingerprint of the base the z vectors belong to.
        skill: The skill's name.
        shoal_version: The shoal version that wrote the file.
        path: Where it was read from (``None`` if built in memory).
        extra: Any other metadata fields.
    """

    z: dict[str, torch.Tensor]
    base_fingerprint: str
    skill: str
    shoal_version: str = ""
    path: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def lengths(self) -> dict[str, int]:
        """Matrix name → z length."""
        return {n: int(v.numel()) for n, v in self.z.items()}


def _check_finite(where: str, name: str, v: torch.Tensor) -> None:
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        n_nan = int(torch.isnan(v).sum())
        raise CheckpointError(
            f"{where}: z of matrix {name!r} holds {n_nan} NaN and {int(bad.sum()) - n_nan} "
            f"infinite values (of {v.numel()})"
        )


def save_expert(
    path: str | Path,
    z: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write an expert file atomically (nothing is written if any check fails).

    Args:
        path: The ``.safetensors`` file to write.
        z: Module name → ``(r,)`` vector (e.g. :meth:`SVFModel.get_z`).
        meta: Must hold ``base_fingerprint`` (the wrapper's
            :attr:`~shoal.adapt.svf.SVFModel.fingerprint`) and ``skill``; any other keys
            are stored as strings.
        overwrite: Replace an existing file.

    Returns:
        ``path``.

    Raises:
        AdaptError: Missing ``base_fingerprint`` / ``skill``, a reserved key, an empty
            ``z`` or a vector that is not 1-D.
        CheckpointError: A vector holds NaN or infinity (naming the matrix).
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
    """
    from shoal import __version__
    from shoal.checkpoint.st_format import build_header

    out = Path(path)
    for key in ("base_fingerprint", "skill"):
        if not str(meta.get(key, "")):
            raise AdaptError(f"{out}: expert metadata needs {key!r}")
    clash = sorted(set(meta) & _RESERVED)
    if clash:
        raise AdaptError(f"{out}: metadata key {clash[0]!r} is reserved")
    if not z:
        raise AdaptError(f"{out}: an expert needs at least one z vector")
    tensors: dict[str, torch.Tensor] = {}
    for name, v in z.items():
        if v.ndim != 1:
            raise AdaptError(f"{out}: z of matrix {name!r} has shape {tuple(v.shape)}, not (r,)")
        t = v.detach().to(device="cpu", dtype=torch.float32).contiguous()
        _check_finite(str(out), name, t)
        tensors[_PREFIX + name] = t
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out}: exists; pass overwrite=True to replace it")
    header = {str(k): str(v) for k, v in meta.items() if k != "base_fingerprint"}
    header.update(
        {
            "format": EXPERT_FORMAT,
            "format_version": EXPERT_FORMAT_VERSION,
            "base": str(meta["base_fingerprint"]),
            "matrices": json.dumps({n: int(v.numel()) for n, v in z.items()}),
            "shoal_version": __version__,
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    # written here rather than by safetensors' save_file, whose metadata order changes
    # from process to process: the same training gives the same bytes
    entries = [(name, tuple(t.shape), t.dtype) for name, t in sorted(tensors.items())]
    prefix, _ = build_header(entries, header)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        f.write(prefix)
        for name, _shape, _dtype in entries:
            f.write(tensors[name].numpy().astype("<f4").tobytes())
    return out


def read_expert(path: str | Path) -> Expert:
    """Read and validate an expert file (without a model).

    Raises:
        CheckpointError: One line naming the file: unreadable, corrupt, not an expert
            file, metadata and tensors disagree, or a z holding NaN / infinity (naming
            the matrix).
    """
    from safetensors.torch import load_file

    from shoal.checkpoint.st_format import read_header

    p = Path(path)
    infos, meta = read_header(p)
    if meta.get("format") != EXPERT_FORMAT:
        raise CheckpointError(f"{p}: not a shoal SVF expert file (format {meta.get('format')!r})")
    if meta.get("format_version") != EXPERT_FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: expert format_version {meta.get('format_version')!r}, "
            f"this version reads {EXPERT_FORMAT_VERSION}"
        )
    try:
        lengths = json.loads(meta["matrices"])
        assert isinstance(lengths, dict)
        lengths = {str(k): int(v) for k, v in lengths.items()}
        base, skill = meta["base"], meta["skill"]
    except (KeyError, ValueError, TypeError, AssertionError):
        raise CheckpointError(f"{p}: corrupt expert metadata") from None
    names = {k[len(_PREFIX) :] for k in infos if k.startswith(_PREFIX)}
    if names != set(lengths) or len(infos) != len(names):
        raise CheckpointError(f"{p}: corrupt expert (tensors do not match the 'matrices' list)")
    for name, r in lengths.items():
        info = infos[_PREFIX + name]
        if info.shape != (r,) or info.dtype != torch.float32:
            raise CheckpointError(
                f"{p}: corrupt expert (z of {name!r} is {info.dtype} {list(info.shape)}, "
                f"expected float32 [{r}])"
            )
    try:
        tensors = load_file(str(p))
    except Exception as exc:  # the library's own errors run to many lines
        raise CheckpointError(f"{p}: unreadable expert ({first_line(exc)})") from None
    z = {name: tensors[_PREFIX + name] for name in lengths}
    for name, v in z.items():
        _check_finite(str(p), name, v)
    extra = {k: v for k, v in meta.items() if k not in _RESERVED | {"skill"}}
    return Expert(z, base, skill, meta.get("shoal_version", ""), p, extra)


def load_expert(
    path: str | Path,
    wrapped: SVFModel,
    *,
    allow_transfer: bool = False,
    apply: bool = True,
) -> Expert:
    """Read an expert, check it fits ``wrapped``, and (by default) set its z.

    Args:
        path: The expert file.
        wrapped: The SVF-wrapped base model.
        allow_transfer: Accept a different base fingerprint, provided the expert names
            exactly the adapted matrices with the same z lengths (the transfer rule in
            the module docstring).
        apply: Set the z vectors on ``wrapped`` (otherwise only check and return them,
            e.g. to mix them with :func:`mix_z`).

    Returns:
        The :class:`Expert`.

    Raises:
        CheckpointError: The file is unreadable, corrupt or holds NaN / infinity.
        AdaptError: Another base (naming the file and both fingerprints), a matrix the
            model does not adapt, a missing matrix, or a z length that differs.
    """
    expert = read_expert(path)
    p = Path(path)
    if expert.base_fingerprint != wrapped.fingerprint and not allow_transfer:
        raise AdaptError(
            f"{p}: expert trained on base {expert.base_fingerprint[:16]}…, this model is "
            f"{wrapped.fingerprint[:16]}… (full: {expert.base_fingerprint} vs "
            f"{wrapped.fingerprint}); shoal adapt export --allow-transfer (in Python "
            "allow_transfer=True) applies it anyway"
        )
    lengths = wrapped.lengths()
    for name, r in expert.lengths().items():
        if name not in lengths:
            raise AdaptError(f"{p}: expert names matrix {name!r}, which this model does not adapt")
        if r != lengths[name]:
            raise AdaptError(
                f"{p}: z of matrix {name!r} has length {r}, this model's has {lengths[name]}"
            )
    missing = [n for n in lengths if n not in expert.z]
    if missing:
        raise AdaptError(
            f"{p}: expert lacks matrix {missing[0]!r} ({len(missing)} adapted matrices missing)"
        )
    if apply:
        wrapped.set_z(expert.z)
    return expert


def mix_z(
    experts: Sequence[Mapping[str, torch.Tensor] | Expert],
    alpha: Sequence[float] | np.ndarray | torch.Tensor,
    per: Literal["model", "matrix"] = "model",
) -> dict[str, torch.Tensor]:
    """The few-shot mixture z′ = Σ_k α_k z_k of K experts (METHODS.md §5).

    Args:
        experts: K experts (or z mappings) over the same matrices and lengths.
        alpha: ``per="model"``: shape ``(K,)``, one weight per expert.
            ``per="matrix"``: shape ``(K, M)`` or flat ``(K·M,)`` (expert-major), one
            weight per expert and matrix, matrices in the first expert's order.
        per: Mix whole models or matrix by matrix.

    Returns:
        Matrix name → fp32 z′. The weights are used as given (no normalisation).

    Raises:
        AdaptError: No experts, experts over different matrices or lengths, or
            ``alpha`` of the wrong shape.
    """
    zs = [e.z if isinstance(e, Expert) else dict(e) for e in experts]
    if not zs:
        raise AdaptError("mix_z: no experts")
    names = list(zs[0])
    lengths = {n: tuple(zs[0][n].shape) for n in names}
    for k, z in enumerate(zs[1:], start=1):
        extra = [n for n in z if n not in lengths]
        if extra:
            raise AdaptError(f"mix_z: expert {k} has matrix {extra[0]!r}, expert 0 has not")
        lacking = [n for n in names if n not in z]
        if lacking:
            raise AdaptError(f"mix_z: expert {k} lacks matrix {lacking[0]!r}")
        for n in names:
            if tuple(z[n].shape) != lengths[n]:
                raise AdaptError(
                    f"mix_z: z of {n!r} has shape {tuple(z[n].shape)} in expert {k}, "
                    f"{lengths[n]} in expert 0"
                )
    a = np.asarray(alpha.detach().cpu() if isinstance(alpha, torch.Tensor) else alpha, float)
    k_, m_ = len(zs), len(names)
    if per == "model":
        if a.shape != (k_,):
            raise AdaptError(f"mix_z: per-model alpha needs shape ({k_},), got {a.shape}")
        a = np.repeat(a[:, None], m_, axis=1)
    elif per == "matrix":
        if a.shape == (k_ * m_,):
            a = a.reshape(k_, m_)
        if a.shape != (k_, m_):
            raise AdaptError(
                f"mix_z: per-matrix alpha needs shape ({k_}, {m_}) or ({k_ * m_},), got {a.shape}"
            )
    else:
        raise AdaptError(f"mix_z: per must be 'model' or 'matrix', not {per!r}")
    out = {}
    for j, n in enumerate(names):
        acc = torch.zeros(lengths[n], dtype=torch.float32, device=zs[0][n].device)
        for k, z in enumerate(zs):
            acc = acc + float(a[k, j]) * z[n].detach().to(acc.device, torch.float32)
        out[n] = acc
    return out
