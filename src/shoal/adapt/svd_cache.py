"""The SVD of the adapted weight matrices, computed once in fp32 and cached on disk.

Singular value fine-tuning (METHODS.md §5) needs the thin SVD W = U diag(σ) Vᵀ of every
chosen matrix. It costs far more than a forward pass on a large model and never changes
for a given base, so it is computed once, in fp32, and written as one safetensors file
``svd-<fingerprint>.safetensors`` in a cache folder (``<name>.U``, ``<name>.S``,
``<name>.Vh`` per matrix). The next call on the same weights reads it back instead.

The key is :func:`matrix_fingerprint`, a sha256 over the chosen matrices' names, dtypes,
shapes and bytes. It is the same fingerprint an expert file records as its base
(:mod:`shoal.adapt.expert`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from shoal._atomic import atomic_path
from shoal.errors import CheckpointError

__all__ = ["CacheInfo", "SVDFactors", "compute_svd", "matrix_fingerprint", "svd_factors"]

log = logging.getLogger(__name__)

CACHE_FORMAT = "shoal-svd-cache"
CACHE_FORMAT_VERSION = "1"


@dataclass(frozen=True)
class SVDFactors:
    """The thin SVD of one matrix, W = U diag(S) Vh, all fp32.

    Attributes:
        U: ``(m, r)`` left singular vectors, r = min(m, n).
        S: ``(r,)`` singular values, descending.
        Vh: ``(r, n)`` right singular vectors, transposed.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor

    @property
    def rank(self) -> int:
        """r = min(m, n): the number of singular values, hence the length of z."""
        return int(self.S.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes the three tensors take."""
        return sum(t.numel() * t.element_size() for t in (self.U, self.S, self.Vh))


@dataclass(frozen=True)
class CacheInfo:
    """What :func:`svd_factors` did.

    Attributes:
        fingerprint: :func:`matrix_fingerprint` of the matrices.
        path: The cache file, or ``None`` when no cache folder was given.
        nbytes: Size of the factors in bytes (the cache file is this plus its header).
        reused: Whether the factors were read from an existing cache file.
        seconds: Wall time spent computing or reading them.
    """

    fingerprint: str
    path: Path | None
    nbytes: int
    reused: bool
    seconds: float


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().cpu().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def matrix_fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over the names, dtypes, shapes and bytes of some weight matrices.

    The hash is over the bytes, not over the path the model came from: one path can hold
    other weights after a fine-tune or a re-download, one set of weights lives under many
    paths (copies, hub cache snapshots), and a model in memory may have been merged or
    edited in place since it was read. Only the bytes say whether a cached SVD, or an
    expert trained on it, belongs to these weights. The dtype is part of the key, so the
    same model loaded in bf16 and in fp32 has two fingerprints (their SVDs differ).

    Args:
        weights: Matrix name → weight tensor (any dtype, any device). Order does not
            matter: names are hashed sorted.

    Returns:
        64 hex digits.
    """
    h = hashlib.sha256(b"shoal-svf-matrices-v1\0")
    for name in sorted(weights):
        w = weights[name]
        h.update(f"{name}\0{w.dtype}\0{tuple(w.shape)}\0".encode())
        h.update(_tensor_bytes(w))
    return h.hexdigest()


def compute_svd(weight: torch.Tensor) -> SVDFactors:
    """The fp32 thin SVD of one 2-D weight, on the weight's device (METHODS.md §5).

    Args:
        weight: ``(m, n)`` tensor of any floating dtype.

    Returns:
        :class:`SVDFactors` with U ``(m, r)``, S ``(r,)``, Vh ``(r, n)``, r = min(m, n).
    """
    if weight.ndim != 2:
        raise ValueError(f"SVD needs a 2-D weight, got shape {tuple(weight.shape)}")
    U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    return SVDFactors(U.contiguous(), S.contiguous(), Vh.contiguous())


def _cache_path(cache_dir: Path, fingerprint: str) -> Path:
    return cache_dir / f"svd-{fingerprint[:32]}.safetensors"


def _read_cache(
    path: Path, fingerprint: str, weights: Mapping[str, torch.Tensor]
) -> dict[str, SVDFactors] | None:
    """The factors stored in ``path`` if it is a whole cache for these weights, else None."""
    from safetensors.torch import load_file

    from shoal.checkpoint.st_format import read_header

    try:
        infos, meta = read_header(path)
    except CheckpointError as exc:
        log.warning("ignoring unreadable SVD cache (%s); computing it again", exc)
        return None
    if meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != fingerprint:
        log.warning("%s: not the SVD cache of these weights; computing it again", path)
        return None
    for name, w in weights.items():
        m, n = w.shape
        r = min(m, n)
        want = {f"{name}.U": (m, r), f"{name}.S": (r,), f"{name}.Vh": (r, n)}
        for key, shape in want.items():
            info = infos.get(key)
            if info is None or info.shape != shape or info.dtype != torch.float32:
                log.warning("%s: %s missing or malformed; computing it again", path, key)
                return None
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # any library error here means a damaged file
        log.warning("%s: unreadable (%s); computing it again", path, exc)
        return None
    out = {}
    for name, w in weights.items():
        out[name] = SVDFactors(
            *(tensors[f"{name}.{part}"].to(w.device) for part in ("U", "S", "Vh"))
        )
    return out


def _write_cache(path: Path, fingerprint: str, factors: Mapping[str, SVDFactors]) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, f in factors.items():
        tensors[f"{name}.U"] = f.U.cpu()
        tensors[f"{name}.S"] = f.S.cpu()
        tensors[f"{name}.Vh"] = f.Vh.cpu()
    meta = {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "fingerprint": fingerprint,
        "matrices": json.dumps({n: f.rank for n, f in factors.items()}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def svd_factors(
    weights: Mapping[str, torch.Tensor],
    cache_dir: str | Path | None = None,
    *,
    fingerprint: str | None = None,
) -> tuple[dict[str, SVDFactors], CacheInfo]:
    """The fp32 thin SVD of each matrix, read from the cache when it is there.

    Args:
        weights: Matrix name → 2-D weight tensor, as stored in the module (for GPT-2's
            ``Conv1D`` that is Wᵀ, whose SVD has the same singular values).
        cache_dir: Folder of cache files; ``None`` computes without caching. A damaged
            or foreign cache file is ignored (logged) and written again.
        fingerprint: :func:`matrix_fingerprint` of ``weights`` if already known.

    Returns:
        ``(factors, info)``: matrix name → :class:`SVDFactors` (on each weight's device),
        and a :class:`CacheInfo` with the file, its size and whether it was reused.
    """
    start = time.perf_counter()
    fp = fingerprint or matrix_fingerprint(weights)
    path = _cache_path(Path(cache_dir), fp) if cache_dir is not None else None
    if path is not None and path.exists():
        cached = _read_cache(path, fp, weights)
        if cached is not None:
            nbytes = sum(f.nbytes for f in cached.values())
            return cached, CacheInfo(fp, path, nbytes, True, time.perf_counter() - start)
    factors = {name: compute_svd(w) for name, w in weights.items()}
    if path is not None:
        _write_cache(path, fp, factors)
    nbytes = sum(f.nbytes for f in factors.values())
    return factors, CacheInfo(fp, path, nbytes, False, time.perf_counter() - start)
