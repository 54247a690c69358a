"""Building one candidate from its recipe into the worker's resident model, in place.

Recipes a worker understands:

- mergekit-style merge recipes (``merge_method: ties``, ``splitpoint``, ...): executed by
  :func:`shoal.merge.merge_into_module`, writing every merged tensor into the resident
  model with ``copy_`` (no model allocated per candidate, no disk round trip);
- ``merge_method: layer_path`` (DFS): :func:`shoal.merge.layer_path.build_from_recipe`
  assembles a model that shares the source models' layers (no weight copies);
- ``{"model": ref}``: a source model or a stored model (``store:<key>``) as it is;
- ``{"merge_method": "random_init", "parameters": {"std": s}}``: every floating parameter
  drawn from N(0, s²) (M2N2 from scratch; METHODS.md §3);
- any of these with a top-level ``mutation: sigma``: Gaussian noise N(0, sigma²) added to
  every floating parameter after building (M2N2 step 4).

All randomness comes from the work item's seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from shoal.errors import CheckpointError, MergeError
from shoal.executors.store import PREFIX, ModelStore

__all__ = ["SourceLoadError", "SourceMap", "build_candidate", "generator_for"]

Tensors = dict[str, torch.Tensor]


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

    def add(self, name: str, path: str) -> None:
        """Let ``name`` refer to the checkpoint at ``path`` (a model named by its path)."""
        self._paths[name] = path
        self._by_path[path] = name

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
    method = body.get("merge_method")
    out = module
    if method is None and set(body) == {"model"}:
        _copy_into(module, sources[str(body["model"])], str(body["model"]))
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
            raise MergeError("layer_path recipes need a worker with a hf-causal-lm loader")
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
    return out
