"""Singular value fine-tuning: a model whose chosen weight matrices scale their singular
values by a vector z (Transformer², Sun et al., 2025; METHODS.md §5).

Each chosen matrix W = U diag(σ) Vᵀ (fp32 thin SVD, :mod:`shoal.adapt.svd_cache`) becomes

    W′ = W + U diag(σ ⊙ (z − 1)) Vᵀ                                   # METHODS.md §5

which equals U diag(σ ⊙ z) Vᵀ in exact arithmetic. Written as a correction to W, z = 1
adds an exact zero, so the wrapped model with z = 1 reproduces the plain model bit for bit
(the product form would not: U diag(σ) Vᵀ differs from W by rounding). The correction is
computed in fp32 and cast to W's dtype before the addition.

With ``rescale=True`` the singular values are rescaled so their sum is kept, σ′ = σ ⊙ z ·
Σσ / Σ(σ ⊙ z) (the reference code's option); z = 1 still gives an exact zero.

The patch is a ``torch.nn.utils.parametrize`` parametrization of each module's
``weight``: no copy of the model, and W′ is rebuilt from the current z at every forward,
so gradients reach z. z is trained directly (one number per singular value, starting at
1); METHODS.md's z = sigmoid(p) parametrisation is left to the caller's optimiser code.
Both ``nn.Linear`` (weight ``(out, in)``) and GPT-2's ``Conv1D`` (weight ``(in, out)``,
i.e. Wᵀ) work: the SVD is of the stored tensor, and Wᵀ = V diag(σ) Uᵀ has the same σ, so
the same z means the same thing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from shoal.adapt.svd_cache import CacheInfo, SVDFactors, matrix_fingerprint, svd_factors
from shoal.checkpoint.layers import layer_index
from shoal.errors import ShoalError

__all__ = [
    "AdaptError",
    "SVFModel",
    "ZVectors",
    "select_matrices",
    "svf_weight",
    "wrap_svf",
]


class AdaptError(ShoalError):
    """An expert, a z vector or a matrix selection does not fit the model."""


# name components that mark a block's attention and MLP submodules across HF families:
# llama/mistral/qwen (self_attn, mlp), gpt2 (attn, mlp), bert (attention, intermediate,
# output), gpt-neox (attention, mlp), t5 (SelfAttention, DenseReluDense), mixtral (experts)
_ATTENTION = {
    "attn",
    "self_attn",
    "attention",
    "selfattention",
    "encdecattention",
    "crossattention",
}
_MLP = {"mlp", "intermediate", "output", "feed_forward", "ffn", "densereludense", "experts"}


def _is_matrix_module(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def select_matrices(model: nn.Module, *, mlp: bool = True, attention: bool = False) -> list[str]:
    """Names of the modules whose weights SVF adapts by default.

    A module qualifies if it is an ``nn.Linear`` or a GPT-2 ``Conv1D`` inside a
    transformer block (its name has a layer index) and one of its name components marks
    attention (``self_attn``, ``attn``, ``attention``, …) or, failing that, the MLP
    (``mlp``, ``intermediate``, ``output``, ``feed_forward``, …). BERT's
    ``attention.output.dense`` is attention; its ``output.dense`` is MLP. Embeddings,
    heads and poolers are never chosen.

    Args:
        model: The model.
        mlp: Include the MLP matrices (the paper's default).
        attention: Include the attention matrices.

    Returns:
        Module names in ``named_modules`` order.

    Raises:
        AdaptError: If nothing qualifies (name the modules instead).
    """
    names = []
    for name, module in model.named_modules():
        if not name or not _is_matrix_module(module) or layer_index(name) is None:
            continue
        parts = {p.lower() for p in name.split(".")}
        if parts & _ATTENTION:
            if attention:
                names.append(name)
        elif parts & _MLP and mlp:
            names.append(name)
    if not names:
        which = " and ".join(w for w, on in (("MLP", mlp), ("attention", attention)) if on)
        raise AdaptError(
            f"{type(model).__name__}: no {which or 'target'} matrices found; "
            "pass the module names explicitly"
        )
    return names


def svf_weight(
    weight: torch.Tensor, factors: SVDFactors, z: torch.Tensor, *, rescale: bool = False
) -> torch.Tensor:
    """W′ = W + U diag(σ′ − σ) Vᵀ with σ′ = σ ⊙ z (METHODS.md §5).

    Args:
        weight: W as stored, any float dtype.
        factors: W's fp32 thin SVD.
        z: ``(r,)`` scales, one per singular value (any float dtype; used in fp32).
        rescale: Scale σ′ so that Σσ′ = Σσ (the reference code's option).

    Returns:
        W′ in ``weight``'s dtype; exactly ``weight`` when z is all ones.
    """
    S = factors.S
    zf = z.to(device=S.device, dtype=S.dtype)
    scaled = S * zf
    if rescale:
        scaled = scaled * (S.sum() / scaled.sum())
    delta = (factors.U * (scaled - S)) @ factors.Vh
    return weight + delta.to(weight.dtype)


class _SVFWeight(nn.Module):
    """The parametrization W ↦ W′ of one module's weight.

    U, S, Vh are non-persistent buffers (they follow ``model.to(...)`` but stay out of
    ``state_dict``); z is read from the owning :class:`ZVectors` through a plain
    attribute, so it is not a parameter of the model.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    _holder: ZVectors

    def __init__(self, factors: SVDFactors, holder: ZVectors, index: int, rescale: bool) -> None:
        super().__init__()
        self.register_buffer("U", factors.U, persistent=False)
        self.register_buffer("S", factors.S, persistent=False)
        self.register_buffer("Vh", factors.Vh, persistent=False)
        self.rescale = rescale
        self.index = index
        object.__setattr__(self, "_holder", holder)  # not a submodule

    def factors(self) -> SVDFactors:
        return SVDFactors(self.U, self.S, self.Vh)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        z = self._holder.vectors[self.index]
        return svf_weight(weight, self.factors(), z, rescale=self.rescale)


class ZVectors(nn.Module):
    """One trainable z vector per adapted matrix, keyed by module name.

    ``nn.ParameterDict`` refuses keys with dots, so the vectors sit in a
    ``ParameterList`` in :attr:`names` order and are looked up by name here.
    """

    def __init__(self, lengths: Mapping[str, int]) -> None:
        super().__init__()
        self.names: list[str] = list(lengths)
        self._index = {n: i for i, n in enumerate(self.names)}
        self.vectors = nn.ParameterList(
            nn.Parameter(torch.ones(r, dtype=torch.float32)) for r in lengths.values()
        )

    def __getitem__(self, name: str) -> nn.Parameter:
        return self.vectors[self._index[name]]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self.names)

    def lengths(self) -> dict[str, int]:
        """Module name → length of its z vector."""
        return {n: int(v.numel()) for n, v in zip(self.names, self.vectors, strict=True)}


class SVFModel:
    """A model with SVF parametrizations on some matrices, and their z vectors.

    Build it with :func:`wrap_svf`. Calling it calls the model. :meth:`parameters`
    yields the z vectors only (hand them to the optimiser); the base parameters are
    frozen while wrapped (``requires_grad`` is restored by :meth:`unwrap`).

    Attributes:
        model: The wrapped model (patched in place).
        z: The :class:`ZVectors` holder.
        fingerprint: :func:`~shoal.adapt.svd_cache.matrix_fingerprint` of the base
            matrices, the key experts record.
        cache: What the SVD step did (:class:`~shoal.adapt.svd_cache.CacheInfo`).
        rescale: Whether Σσ is kept (see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        factors: Mapping[str, SVDFactors],
        cache: CacheInfo,
        *,
        rescale: bool = False,
        freeze: bool = True,
    ) -> None:
        self.model = model
        self.fingerprint = cache.fingerprint
        self.cache = cache
        self.rescale = rescale
        self.z = ZVectors({n: f.rank for n, f in factors.items()})
        self._factors = dict(factors)
        self._grad_flags: dict[str, bool] = {}
        if freeze:
            for pname, p in model.named_parameters():
                self._grad_flags[pname] = p.requires_grad
                p.requires_grad_(False)
        self._wrapped = False
        self._register()

    # -- patching ---------------------------------------------------------------------------
    def _register(self) -> None:
        for i, name in enumerate(self.z.names):
            module = self.model.get_submodule(name)
            factors = self._factors[name]
            w = cast(torch.Tensor, module.weight)
            factors = SVDFactors(*(t.to(w.device) for t in (factors.U, factors.S, factors.Vh)))
            parametrize.register_parametrization(
                module, "weight", _SVFWeight(factors, self.z, i, self.rescale), unsafe=True
            )
        self._wrapped = True

    def _remove(self) -> None:
        for name in self.z.names:
            module = self.model.get_submodule(name)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        self._wrapped = False

    def unwrap(self) -> nn.Module:
        """Remove the patches and give back the plain model (its original weights and
        ``requires_grad`` flags). The :class:`SVFModel` is spent afterwards."""
        if self._wrapped:
            self._remove()
        params = dict(self.model.named_parameters())
        for pname, flag in self._grad_flags.items():
            if pname in params:
                params[pname].requires_grad_(flag)
        self._grad_flags = {}
        return self.model

    @contextlib.contextmanager
    def unwrapped(self) -> Iterator[nn.Module]:
        """The plain model for the block (e.g. to ``save_pretrained``), wrapped again after."""
        if not self._wrapped:
            raise AdaptError("model already unwrapped")
        self._remove()
        try:
            yield self.model
        finally:
            self._register()

    @contextlib.contextmanager
    def cached(self) -> Iterator[None]:
        """Build each W′ once for the block instead of at every forward (inference)."""
        with parametrize.cached():
            yield

    # -- z ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The adapted modules' names."""
        return list(self.z.names)

    def lengths(self) -> dict[str, int]:
        """Module name → z length (its number of singular values)."""
        return self.z.lengths()

    def factors(self, name: str) -> SVDFactors:
        """The fp32 SVD of one adapted matrix."""
        return self._factors[name]

    def base_weight(self, name: str) -> torch.Tensor:
        """The unpatched weight W of one adapted module (as stored)."""
        module = self.model.get_submodule(name)
        return module.parametrizations.weight.original  # type: ignore[union-attr,return-value]

    def parameters(self) -> Iterator[nn.Parameter]:
        """The z vectors, for an optimiser."""
        return iter(self.z.vectors)

    def num_trainable(self) -> int:
        """How many numbers z holds."""
        return sum(self.lengths().values())

    def get_z(self) -> dict[str, torch.Tensor]:
        """A detached fp32 copy of every z vector, by module name."""
        return {n: v.detach().clone() for n, v in zip(self.z.names, self.z.vectors, strict=True)}

    def check_z(self, z: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
        """Raise unless ``z`` names adapted matrices with the right lengths.

        Args:
            z: Module name → vector.
            strict: Also require every adapted matrix to be present.

        Raises:
            AdaptError: Naming the unknown, missing or mis-sized matrix.
        """
        lengths = self.lengths()
        for name, v in z.items():
            if name not in lengths:
                raise AdaptError(f"z names matrix {name!r}, which this model does not adapt")
            if tuple(v.shape) != (lengths[name],):
                raise AdaptError(
                    f"z for {name!r} has shape {tuple(v.shape)}, the matrix has "
                    f"{lengths[name]} singular values"
                )
        if strict:
            missing = [n for n in lengths if n not in z]
            if missing:
                raise AdaptError(f"z lacks matrix {missing[0]!r} ({len(missing)} missing)")

    def set_z(self, z: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
        """Copy vectors into the z parameters (in place, no gradient).

        Args:
            z: Module name → ``(r,)`` vector.
            strict: Require every adapted matrix; otherwise the others are left as they are.
        """
        self.check_z(z, strict=strict)
        with torch.no_grad():
            for name, v in z.items():
                p = self.z[name]
                p.copy_(v.to(device=p.device, dtype=p.dtype))

    def reset_z(self) -> None:
        """Set every z to 1 (the base model)."""
        with torch.no_grad():
            for v in self.z.vectors:
                v.fill_(1.0)

    @contextlib.contextmanager
    def using_z(self, z: Mapping[str, torch.Tensor] | None) -> Iterator[SVFModel]:
        """Run the block with ``z`` (``None``: all ones), then restore the previous z."""
        saved = self.get_z()
        try:
            if z is None:
                self.reset_z()
            else:
                self.set_z(z)
            yield self
        finally:
            self.set_z(saved)

    def to(self, *args: Any, **kwargs: Any) -> SVFModel:
        """Move the model and the z vectors (``nn.Module.to`` arguments)."""
        self.model.to(*args, **kwargs)
        self.z.to(*args, **kwargs)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # -- folding ----------------------------------------------------------------------------
    def folded_weights(
        self, z: Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The plain weights W′ for ``z`` (default: the current z), as ``state_dict`` keys.

        Args:
            z: Module name → vector; every adapted matrix must be present.

        Returns:
            ``"<module>.weight"`` → W′ (detached, W's dtype and device), computed by the
            same :func:`svf_weight` the forward uses, so a model loaded with them gives
            the same outputs as this one with ``z``.
        """
        if z is not None:
            self.check_z(z)
        current = z if z is not None else self.get_z()
        out = {}
        with torch.no_grad():
            for name in self.z.names:
                out[f"{name}.weight"] = svf_weight(
                    self.base_weight(name),
                    self._param(name).factors(),
                    current[name],
                    rescale=self.rescale,
                ).detach()
        return out

    def _param(self, name: str) -> _SVFWeight:
        module = self.model.get_submodule(name)
        return module.parametrizations.weight[0]  # type: ignore[union-attr,index,return-value]

    def folded_state_dict(self, z: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """The plain model's ``state_dict`` with W′ in place of each adapted W."""
        folded = self.folded_weights(z)
        with self.unwrapped() as plain:
            sd = dict(plain.state_dict())
        for key, w in folded.items():
            sd[key] = w
        return sd

    def save_folded(
        self,
        out_dir: str | Path,
        z: Mapping[str, torch.Tensor] | None = None,
        *,
        overwrite: bool = False,
    ) -> Path:
        """Write the plain model with W′ folded in (``save_pretrained``), atomically.

        The folder loads with ``from_pretrained`` and holds no trace of SVF.

        Args:
            out_dir: The output folder.
            z: The z vectors to fold (default: the current z).
            overwrite: Replace an existing folder.

        Returns:
            ``out_dir``.

        Raises:
            OutputExistsError: If ``out_dir`` exists and ``overwrite`` is false.
        """
        from shoal._atomic import atomic_dir, remove_stale_temp_siblings
        from shoal.errors import OutputExistsError

        out = Path(out_dir)
        if out.exists() and not overwrite:
            raise OutputExistsError(f"{out}: exists; pass overwrite=True to replace it")
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_siblings(out)
        folded = self.folded_weights(z)
        with atomic_dir(out) as tmp, self.unwrapped() as plain:
            sd = dict(plain.state_dict())
            sd.update(folded)
            plain.save_pretrained(tmp, state_dict=sd)  # type: ignore[operator]
        return out


def wrap_svf(
    model: nn.Module,
    names: Sequence[str] | None = None,
    *,
    attention: bool = False,
    mlp: bool = True,
    cache_dir: str | Path | None = None,
    rescale: bool = False,
    freeze: bool = True,
) -> SVFModel:
    """Patch ``model`` in place so its chosen matrices follow W′ = W + U diag(σ ⊙ (z − 1)) Vᵀ.

    Args:
        model: A torch / transformers model (not already SVF-wrapped).
        names: Module names to adapt; default :func:`select_matrices` (the MLP matrices,
            plus attention with ``attention=True``).
        attention: With ``names=None``, also adapt the attention matrices.
        mlp: With ``names=None``, adapt the MLP matrices.
        cache_dir: Folder for the SVD cache (:func:`~shoal.adapt.svd_cache.svd_factors`);
            ``None`` computes the SVD without caching.
        rescale: Keep Σσ (the reference code's option).
        freeze: Set ``requires_grad=False`` on every base parameter while wrapped.

    Returns:
        The :class:`SVFModel`, with z = 1 (the model computes exactly what it did).

    Raises:
        AdaptError: A name that is not a ``Linear`` / ``Conv1D`` module of ``model``, a
            repeated name, an already wrapped module, or nothing to adapt.
    """
    if names is None:
        names = select_matrices(model, mlp=mlp, attention=attention)
    names = list(names)
    if not names:
        raise AdaptError("no matrices to adapt")
    modules = dict(model.named_modules())
    seen: set[str] = set()
    weights: dict[str, torch.Tensor] = {}
    for name in names:
        module = modules.get(name)
        if module is None:
            raise AdaptError(f"{type(model).__name__} has no module {name!r}")
        if not _is_matrix_module(module):
            raise AdaptError(
                f"module {name!r} is a {type(module).__name__}, not a Linear or Conv1D"
            )
        if name in seen:
            raise AdaptError(f"module {name!r} named twice")
        if parametrize.is_parametrized(module, "weight"):
            raise AdaptError(f"module {name!r} is already wrapped; unwrap it first")
        seen.add(name)
        weights[name] = module.weight.detach()
    fp = matrix_fingerprint(weights)
    factors, info = svd_factors(weights, cache_dir, fingerprint=fp)
    return SVFModel(model, factors, info, rescale=rescale, freeze=freeze)
