"""Building one candidate from its recipe into the worker's resident model, in place.

Recipes a worker understands:

- mergekit-style merge recipes (``merge_method: ties``, ``splitpoint``, ...): executed by
  :func:`shoal.merge.merge_into_module`, writing every merged tensor into the resident
  model with ``copy_`` (no model allocated per candidate, no disk round trip);
- ``merge_method: layer_path`` (DFS): :func:`shoal.merge.layer_path.build_from_recipe`
  assembles a model that shares the source models' layers (no weight copies);
- ``{"model": ref}``: a source model or a stored model (``store:<key>``) as it is; into a
  resident vision-language model, a plain causal LM becomes its language part (vision
  tower and projector from the first VLM among the models; ``docs/vlm.md``) and a VLM
  saved in the other layout of names is renamed;
- ``{"merge_method": "random_init", "parameters": {"std": s}}``: every floating parameter
  drawn from N(0, s²) (M2N2 from scratch; METHODS.md §3);
- any of these with a top-level ``mutation: sigma``: Gaussian noise N(0, sigma²) added to
  every floating parameter after building (M2N2 step 4);
- any of these with a top-level ``svd_mutation: {expert, base, w_max, rank, seed}``: every
  2-D parameter moved along the singular directions of the expert's task vector
  (CycleQD, METHODS.md §1 and §4; :func:`apply_svd_mutation`).

All randomness comes from the work item's seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal.errors import CheckpointError, MergeError
from shoal.executors.store import PREFIX, ModelStore
from shoal.merge.vlm import is_vlm_dir

__all__ = [
    "SourceLoadError",
    "SourceMap",
    "apply_svd_mutation",
    "build_candidate",
    "generator_for",
    "svd_factors",
]

Tensors = dict[str, torch.Tensor]
SVDFactors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def generator_for(seed: int, stream: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator for one named random stream of a candidate (merge, init, mutation)."""
    state = np.random.SeedSequence([seed, stream]).generate_state(2, np.uint32)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state[0]) << 32 | int(state[1]))
    return gen


class SourceLoadError(CheckpointError):
    """A model the config names cannot be used (unreadable, corrupt, NaN weights).

    Unlike a candidate that fails to build, this fails every candidate that uses the
    model, so a run stops on it rather than scoring those candidates 0.
    """


class SourceMap(Mapping[str, Tensors]):
    """Model reference -> state dict, loading sources once and store entries on demand.

    Keys are model names from the config, their paths, and ``store:<key>`` references.
    """

    def __init__(
        self,
        models: Mapping[str, str],
        store: ModelStore | None,
        load: Callable[[str], Tensors],
    ) -> None:
        self._paths = dict(models)
        self._by_path = {v: k for k, v in self._paths.items()}
        self._store = store
        self._load = load
        self._cache: dict[str, Tensors] = {}
        #: (expert, base, rank) -> tensor name -> (U, σ, Vᵀ); see :func:`svd_factors`
        self.svd_cache: dict[tuple[str, str, int | None], dict[str, SVDFactors]] = {}
        #: where :func:`svd_factors` keeps a copy of the factors (the run folder's ``svd/``)
        self.svd_dir: Path | None = None

    def add(self, name: str, path: str) -> None:
        """Let ``name`` refer to the checkpoint at ``path`` (a model named by its path)."""
        self._paths[name] = path
        self._by_path[path] = name

    def name_of(self, ref: str) -> str | None:
        """The config name of a config model (by name or path), else ``None``."""
        return self._name(ref)

    def path_of(self, ref: str) -> str | None:
        """The checkpoint path of a config model (by name or path), else ``None``."""
        name = self._name(ref)
        return None if name is None else self._paths[name]

    def _name(self, ref: str) -> str | None:
        if ref in self._paths:
            return ref
        return self._by_path.get(ref)

    def __contains__(self, ref: object) -> bool:
        if not isinstance(ref, str):
            return False
        if ref.startswith(PREFIX):
            return self._store is not None and ref in self._store
        return self._name(ref) is not None

    def __getitem__(self, ref: str) -> Tensors:
        if ref.startswith(PREFIX):
            if self._store is None:
                raise KeyError(ref)
            return self._store.get(ref)
        name = self._name(ref)
        if name is None:
            raise KeyError(ref)
        if name not in self._cache:
            try:
                self._cache[name] = self._load(self._paths[name])
            except CheckpointError as exc:
                raise SourceLoadError(f"models.{name}: {exc}") from exc
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        yield from self._paths
        if self._store is not None:
            yield from (PREFIX + k for k in sorted(self._store.keys()))

    def __len__(self) -> int:
        return len(self._paths) + (len(self._store.keys()) if self._store is not None else 0)


def _float_params(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    seen: set[int] = set()
    for p in module.parameters():
        if p.is_floating_point() and id(p) not in seen:
            seen.add(id(p))
            yield p


def _copy_into(module: torch.nn.Module, tensors: Tensors, ref: str) -> None:
    """Copy a model's tensors into the resident module: every tensor of the module, and
    none it has no place for (a deeper model's layers must not be cut off silently)."""
    target = module.state_dict(keep_vars=True)
    missing = [k for k in target if k not in tensors]
    # tied weights may be stored under one name only; every other tensor must be there
    tied = {k for k in missing if any(target[k] is target[o] for o in tensors if o in target)}
    if set(missing) - tied:
        raise MergeError(f"model {ref!r} lacks tensor {sorted(set(missing) - tied)[0]!r}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name not in target:
                raise MergeError(f"model {ref!r}: tensor {name!r} has no place in the model")
            if tuple(target[name].shape) != tuple(tensor.shape):
                raise MergeError(
                    f"model {ref!r}: tensor {name!r} shape {list(tensor.shape)} differs from "
                    f"the model's {list(target[name].shape)}"
                )
            target[name].copy_(tensor)


def _fit_to_module(
    module: torch.nn.Module, tensors: Tensors, sources: SourceMap, ref: str
) -> Tensors:
    """A source's tensors under the names of a resident VLM (``{model: ref}``).

    A resident that is no VLM, or tensors in its own layout, are left as they are. A VLM
    in the other layout (``legacy`` on disk, ``module`` in memory) is renamed. A plain
    causal LM becomes the language part (the mapping ``shoal merge`` uses), with every
    other tensor (vision tower, projector) from the first VLM among the config's models.

    Raises:
        MergeError: a causal LM into a VLM when no model of the config is a VLM.
    """
    from shoal.merge.vlm import detect_layout, to_language_name, to_layout, to_vlm_name

    target = detect_layout(list(module.state_dict().keys()))
    if target is None:
        return tensors
    layout = detect_layout(list(tensors))
    if layout is target:
        return tensors
    if layout is not None:
        return {to_layout(n, layout, target): t for n, t in tensors.items()}
    names = [n for n in sources if not n.startswith(PREFIX)]
    vlm_ref = next((n for n in names if is_vlm_dir(sources.path_of(n))), None)
    if vlm_ref is None:
        raise MergeError(
            f"model {ref!r}: a causal LM goes into the resident vision-language model as its "
            "language part, but no model of the config is a VLM to give the vision tower"
        )
    vlm = sources[vlm_ref]
    vlm_layout = detect_layout(list(vlm))
    if vlm_layout is None:
        raise MergeError(f"model {vlm_ref!r}: its tensors are not a vision-language model's")
    out = {
        to_layout(n, vlm_layout, target): t
        for n, t in vlm.items()
        if to_language_name(n, vlm_layout) is None
    }
    out.update((to_vlm_name(n, target), t) for n, t in tensors.items())
    return out


def build_candidate(
    module: torch.nn.Module,
    recipe: Mapping[str, Any],
    sources: SourceMap,
    seed: int,
    *,
    hf_models: Callable[[list[str]], dict[str, Any]] | None = None,
) -> torch.nn.Module:
    """Build the model ``recipe`` describes; returns the model to score.

    Args:
        module: The resident model, overwritten in place (returned for every recipe except
            ``layer_path``, which returns a new module sharing the sources' layers).
        recipe: The recipe dict.
        sources: Reference -> state dict.
        seed: The candidate's seed (merge randomness, init, mutation).
        hf_models: For ``layer_path``: loads source models by name (cached by the caller).

    Raises:
        MergeError / RecipeError / CheckpointError: The recipe does not fit the models.
    """
    body = dict(recipe)
    sigma = float(body.pop("mutation", 0.0) or 0.0)
    svd_spec = body.pop("svd_mutation", None)
    method = body.get("merge_method")
    out = module
    if method is None and set(body) == {"model"}:
        ref = str(body["model"])
        tensors = _fit_to_module(module, sources[ref], sources, ref)
        try:
            _copy_into(module, tensors, ref)
        except MergeError as exc:
            path = sources.path_of(ref)
            if path is None:  # a stored child: the candidate's problem
                raise
            # a model of the config that cannot be the model the run builds: every recipe
            # that names it fails, so the run stops on it (one line) instead of scoring 0
            raise SourceLoadError(f"models.{sources.name_of(ref)}: {path}: {exc}") from exc
    elif method == "random_init":
        params = body.get("parameters") or {}
        std = float(params.get("std", 0.01))
        # a seed inside the recipe makes the init part of its content (store keys)
        gen = generator_for(int(params.get("seed", seed)), 1)
        with torch.no_grad():
            for p in _float_params(module):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
    elif method == "layer_path":
        from shoal.merge.layer_path import build_from_recipe, parse_layer_path

        if hf_models is None:
            raise MergeError("layer_path recipes need a worker with an hf-causal-lm/hf-vlm loader")
        if sigma > 0:  # the layers are shared with the sources: noise would corrupt them
            raise MergeError("layer_path recipes cannot carry a mutation")
        lp = parse_layer_path(body)
        out = build_from_recipe(lp, hf_models(list(lp.models)))
    else:
        from shoal.merge import merge_into_module

        # sources were checked for NaN/Inf once when loaded (worker.load_tensors)
        merge_into_module(module, body, sources, seed=seed, allow_nonfinite=True)
    if sigma > 0:
        gen = generator_for(seed, 2)
        with torch.no_grad():
            for p in _float_params(out):
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * sigma
                p.add_(noise.to(device=p.device, dtype=p.dtype))
    if svd_spec is not None:
        if method == "layer_path":
            raise MergeError("layer_path recipes cannot carry an svd_mutation")
        apply_svd_mutation(out, svd_spec, sources, seed)
    return out


def svd_factors(
    sources: SourceMap, expert: str, base: str, rank: int | None = None
) -> dict[str, SVDFactors]:
    """Thin SVD of the task vector τ = θ_expert − θ_base of every 2-D tensor, in float32.

    Computed once per (expert, base, rank) and kept in ``sources.svd_cache`` (the worker's
    lifetime) and, when ``sources.svd_dir`` is set (the run folder's ``svd/``), in a file
    there that later workers and resumed runs read instead of recomputing. ``rank`` keeps
    the top r singular triplets: U (m, r), σ (r,), Vᵀ (r, n), 4·(m + n + 1)·r bytes per
    matrix instead of 4·(m + n + 1)·min(m, n).
    """
    key = (expert, base, rank)
    if key in sources.svd_cache:
        return sources.svd_cache[key]
    file = _svd_file(sources, expert, base, rank)
    out: dict[str, SVDFactors] = {}
    if file is not None and file.is_file():
        from safetensors.torch import load_file

        flat = load_file(str(file))
        names = {k.rsplit(".", 1)[0] for k in flat}
        out = {n: (flat[f"{n}.U"], flat[f"{n}.S"], flat[f"{n}.Vh"]) for n in sorted(names)}
    else:  # only now are the two models read
        theta_e, theta_b = sources[expert], sources[base]
        for name, t in theta_e.items():
            if t.ndim != 2 or not t.is_floating_point() or name not in theta_b:
                continue
            tau = t.to(torch.float32) - theta_b[name].to(torch.float32)
            u, s, vh = torch.linalg.svd(tau, full_matrices=False)
            if rank is not None:
                u, s, vh = u[:, :rank], s[:rank], vh[:rank]
            out[name] = (u.contiguous(), s.contiguous(), vh.contiguous())
        if file is not None:
            _write_svd(file, out)
    sources.svd_cache[key] = out
    return out


def _svd_file(sources: SourceMap, expert: str, base: str, rank: int | None) -> Path | None:
    """The cache file of one (expert, base, rank), or ``None`` without a run folder.

    Named by a hash of the two models' paths and the rank, so a model moved or replaced
    between sessions gets new factors.
    """
    if sources.svd_dir is None or not sources.svd_dir.parent.is_dir():
        return None  # e.g. a Ray worker on a host without the run folder
    paths = [sources._paths.get(r, r) for r in (expert, base)]
    digest = hashlib.sha256(repr((paths, rank)).encode()).hexdigest()[:16]
    return sources.svd_dir / f"{digest}.safetensors"


def _write_svd(file: Path, factors: dict[str, SVDFactors]) -> None:
    """Write the factors atomically (several workers may race: the last rename wins)."""
    from safetensors.torch import save_file

    from shoal._atomic import atomic_path

    flat = {}
    for name, (u, s, vh) in factors.items():
        flat.update({f"{name}.U": u, f"{name}.S": s, f"{name}.Vh": vh})
    file.parent.mkdir(exist_ok=True)
    with atomic_path(file) as tmp:
        save_file(flat, str(tmp))


def apply_svd_mutation(
    module: torch.nn.Module, spec: Mapping[str, Any], sources: SourceMap, seed: int
) -> None:
    """CycleQD's SVD mutation of a built model, in place (METHODS.md §1 ``svd_mutation``).

    Every 2-D floating parameter θ with a factorised task vector gets
    θ += U diag(w ⊙ σ) Vᵀ, w ~ U[0, w_max]^r, the w of all matrices drawn in the module's
    parameter order from one generator (``spec["seed"]`` if given, else the work item's
    seed). Other tensors are left as built.

    Args:
        module: The built model.
        spec: ``{"expert": name, "base": name, "w_max": 0.1, "rank": r | None, "seed": s}``.
        sources: Reference -> state dict (holds the SVD cache).
        seed: The work item's seed.

    Raises:
        MergeError: A malformed spec or a model the sources lack.
    """
    from shoal.ops.svd_mutation import svd_mutation

    if not isinstance(spec, Mapping) or not {"expert", "base"} <= set(spec):
        raise MergeError("svd_mutation needs a mapping with 'expert' and 'base'")
    unknown = set(spec) - {"expert", "base", "w_max", "rank", "seed"}
    if unknown:
        raise MergeError(f"svd_mutation: unknown key(s) {sorted(unknown)}")
    for ref in (spec["expert"], spec["base"]):
        if str(ref) not in sources:
            raise MergeError(f"svd_mutation: unknown model {ref!r}")
    rank = spec.get("rank")
    factors = svd_factors(
        sources, str(spec["expert"]), str(spec["base"]), None if rank is None else int(rank)
    )
    gen = generator_for(int(spec.get("seed", seed)), 3)
    w_max = float(spec.get("w_max", 0.1))
    seen: set[int] = set()
    with torch.no_grad():
        for name, p in module.state_dict(keep_vars=True).items():
            if id(p) in seen or name not in factors or not p.is_floating_point():
                continue
            seen.add(id(p))
            u, s, vh = (f.to(p.device) for f in factors[name])
            mutated = svd_mutation(p.detach(), u, s, vh, gen, w_max=w_max)
            p.copy_(mutated.to(dtype=p.dtype))
