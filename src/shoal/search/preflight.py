"""Checking a run config before anything of the run is written.

:func:`check_run` does every check that needs no candidate to be evaluated: task specs and
named baselines; each source model's (and baseline path's) checkpoint headers, and, when
any algorithm merges tensor-wise, that a tensor name has one shape across them; the
device; the loader's model; building every task (fitness and test); each algorithm
block's name and options; constructing the first algorithm. A user mistake is one
:class:`~shoal.errors.ShoalError` naming the config key (and the file at fault). What it
cannot see: NaN weights (that would read every tensor; the first batch finds them) and
later stages' models, which earlier stages make.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal._devices import resolve_device
from shoal.errors import CheckpointError, MergeError, RecipeError, ShoalError
from shoal.search.algorithms.base import validate_options
from shoal.search.context import (
    algorithm_class,
    algorithm_key,
    callable_resident,
    forget_callable_residents,
    make_algorithm,
    options_named_at,
    prefix_error,
)

if TYPE_CHECKING:
    from shoal.search.config import RunConfig

__all__ = ["check_run", "model_refs"]


def check_run(config: RunConfig) -> dict[str, int]:
    """Check everything a run needs that no evaluation is needed for.

    Later stages, whose models include earlier stages' results, get their algorithm name
    and options checked; the first stage's algorithm is constructed.

    Returns:
        Fitness task name -> number of examples, in config order, as every executor's
        workers will build them (the algorithms are made with these names and sizes).

    Raises:
        ShoalError: The first problem, naming the config key and the file at fault.
    """
    forget_callable_residents()  # models may have changed since an earlier run
    resolve_device(config.executor.device, what="executor.device")
    _check_task_specs(config)
    paths = {f"models.{k}": v for k, v in config.models.items()} | _check_baselines(config)
    shapes = _read_headers(paths)
    from shoal.merge.vlm import language_shapes  # a VLM beside causal LMs: its language part

    shapes = language_shapes(shapes)
    sizes = _build_tasks(config, _resident_tokenizer(config))
    # after the loader and tasks: modules they import may register algorithms, as in a run
    if _check_algorithm_blocks(config, list(sizes)):
        first = config.base_model or next(iter(config.models), None)
        if first is not None:  # a run from scratch merges models it draws itself
            _check_same_tensors(shapes, paths, f"models.{first}")
    _check_merge_steps(config)
    index, stage, block, _ = config.algorithm_blocks()[0]
    if index > 0:  # its models include a merge step's result, which does not exist yet
        return sizes
    make_algorithm(
        config,
        block,
        dict(config.models),
        config.seed,
        sizes,
        label=stage or str(block["name"]),
        where=algorithm_key(config, 0),
    )
    return sizes


def _check_task_specs(config: RunConfig) -> None:
    import shoal.executors.testbed_task  # noqa: F401  (registers `testbed`)
    from shoal.tasks.registry import validate_task_spec

    for split in ("fitness", "validation", "test"):
        for i, spec in enumerate(getattr(config.tasks, split)):
            validate_task_spec(spec, f"tasks.{split}[{i}]")


def _check_baselines(config: RunConfig) -> dict[str, str]:
    """Named baseline recipes are checked before the search, not after it.

    Returns:
        Config key -> checkpoint path of every model a baseline names by path.
    """
    from shoal.recipe import load_recipe

    if not isinstance(config.baselines, dict):
        return {}
    # a model reference is a config model, an earlier stage's result, or a path
    known = set(config.models) | {s.name for s in config.stages or []}
    paths: dict[str, str] = {}
    for name, recipe in config.baselines.items():
        where = f"baselines.{name}"
        if set(recipe) != {"model"}:
            try:
                load_recipe(recipe)
            except RecipeError as exc:
                raise prefix_error(exc, where) from None
        for key, ref in model_refs(recipe, where).items():
            if ref in known:
                continue
            if not config.resolve(ref).exists():
                names = ", ".join(config.models) or "none"
                raise RecipeError(f"{key}: unknown model {ref!r} (known: {names})")
            paths[key] = str(config.resolve(ref))
    return paths


def model_refs(recipe: Mapping[str, Any], where: str = "") -> dict[str, str]:
    """Config key -> model reference, for every model a recipe names."""
    refs = {f"{where}.{k}": recipe.get(k) for k in ("model", "base_model")}
    for j, m in enumerate(recipe.get("models") or []):
        if isinstance(m, dict):
            refs[f"{where}.models[{j}].model"] = m.get("model")
    return {k: str(v) for k, v in refs.items() if v is not None}


def _check_algorithm_blocks(config: RunConfig, task_names: Sequence[str]) -> bool:
    """Check each block's name and options; True if any algorithm merges tensor-wise.

    A block's ``models`` and ``seeds`` must name models of the config or earlier stages
    (whose results join the models under the stage's name), its ``tasks`` fitness tasks: a
    later stage would otherwise fail only once the earlier ones have spent their budget.
    """
    tensorwise = False
    stages = config.stages or []
    for i, _, block, _ in config.algorithm_blocks():
        known = [*config.models, *(s.name for s in stages[:i])]  # earlier stages' results
        where = algorithm_key(config, i)
        cls = algorithm_class(str(block["name"]), where)
        options = validate_options(
            cls.Options, {k: v for k, v in block.items() if k != "name"}, where
        )
        tensorwise = tensorwise or cls.tensorwise
        for key, noun, names in (
            ("models", "model", known),
            ("seeds", "model", known),
            ("tasks", "task", task_names),
        ):
            given = block.get(key)
            if not isinstance(given, list) or not all(isinstance(n, str) for n in given):
                continue  # an option of that name meaning something else
            unknown = [n for n in given if n not in names]
            if unknown:
                raise RecipeError(
                    f"{where}.{key}: unknown {noun} {unknown[0]!r} (known: {', '.join(names)})"
                )
        with options_named_at(where):
            cls.check_block(
                options, models=known, task_names=task_names, base_model=config.base_model
            )
    return tensorwise


def _check_merge_steps(config: RunConfig) -> None:
    """Every ``merge`` step's recipe file reads and validates (all of its stages), and the
    models it names are paths, or models of the config or earlier stages."""
    from shoal.merge.multi import check_recipe_file

    for i, stage in enumerate(config.stages or []):
        if stage.merge is None:
            continue
        earlier = {s.name for s in (config.stages or [])[:i]}
        names = {**config.models, **dict.fromkeys(earlier, "")}
        try:
            check_recipe_file(stage.merge, names)
        except ShoalError as exc:
            raise prefix_error(exc, f"stages[{i}].merge") from None


def _read_headers(paths: Mapping[str, str]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Each checkpoint's tensor shapes, from its headers only.

    Args:
        paths: Config key (``models.expert-gcd``) -> checkpoint path.

    Returns:
        Config key -> tensor name -> shape.
    """
    from shoal.checkpoint import tensor_shapes

    shapes = {}
    for key, path in paths.items():
        try:
            shapes[key] = tensor_shapes(path)
        except ShoalError as exc:
            raise prefix_error(exc, key) from None
    return shapes


def _check_same_tensors(
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
    paths: Mapping[str, str],
    reference: str,
) -> None:
    """Each tensor has one shape in every model; every model has the reference's weights.

    Tensor-wise merges need both. Only ``*.weight`` tensors of the reference model (the
    base, else the first) are required: buffers (``inv_freq``, GPT-2's ``attn.bias``
    mask) come and go with how a checkpoint was saved, and a tensor only another model
    or a baseline has is left out by the worker. An output head a model leaves out is no
    gap when its weights may be tied to the embeddings (``save_pretrained`` writes a
    tied tensor once): only ``tie_word_embeddings: false`` makes its absence an error.
    """
    first: dict[str, tuple[tuple[int, ...], str]] = {}  # tensor -> (shape, key)
    for key, tensors in shapes.items():
        for tensor, shape in tensors.items():
            seen, other = first.setdefault(tensor, (shape, key))
            if seen != shape:
                raise MergeError(
                    f"{key}: tensor {tensor!r} has shape {list(shape)} in {paths[key]}, "
                    f"but {list(seen)} in {other}"
                )
    required = [t for t in shapes[reference] if t.endswith(".weight")]
    for key, tensors in shapes.items():
        if not key.startswith("models."):
            continue  # baselines are scored, not merged
        for tensor in required:
            if tensor not in tensors and not (_is_head(tensor) and _may_tie(paths[key])):
                raise MergeError(
                    f"{key}: tensor {tensor!r} missing from {paths[key]} (it is in {reference})"
                )


def _is_head(tensor: str) -> bool:
    parts = tensor.split(".")
    return len(parts) >= 2 and parts[-2] in ("lm_head", "embed_out", "output")


def _may_tie(path: str) -> bool:
    """Whether a model's output head may share the embeddings' tensor."""
    from shoal.checkpoint.files import read_config

    config = Path(path) / "config.json"
    try:
        return read_config(config).get("tie_word_embeddings") is not False
    except CheckpointError:  # no config (a plain file) or an unreadable one: no verdict
        return True


def _resident_tokenizer(config: RunConfig) -> Any:
    """The tokenizer tasks are built with, once the loader is known to find its model."""
    from shoal.executors.loaders import diffusers_class, hf_model_dir, hf_tokenizer, loader_model

    loader = config.loader
    if loader.type == "callable":
        return callable_resident(config, dict(config.models))[1]
    if loader.type == "diffusers-model":  # its config names a class; no tokenizer
        diffusers_class(
            loader_model(loader.model_dump(), config.models, config.base_model, loader.type)[1]
        )
        return None
    path = hf_model_dir(loader.model_dump(), config.models, config.base_model, loader.type)
    import transformers

    auto_config: Any = transformers.AutoConfig
    try:
        auto_config.from_pretrained(path)
    except (OSError, ValueError) as exc:
        where = "loader.model" if loader.model else "models"
        raise CheckpointError(f"{where}: {path / 'config.json'}: {_one_line(exc)}") from None
    return hf_tokenizer(path)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _build_tasks(config: RunConfig, tokenizer: Any) -> dict[str, int]:
    """Build every task once, as a worker would; returns fitness task name -> examples."""
    from shoal.tasks.base import Task
    from shoal.tasks.registry import TaskEnv, add_task

    env = TaskEnv(tokenizer=tokenizer, root=config.root, device=config.executor.device)
    tasks: dict[str, Task] = {}
    sizes: dict[str, int] = {}
    for split in ("fitness", "validation", "test"):
        for i, spec in enumerate(getattr(config.tasks, split)):
            where = f"tasks.{split}[{i}]"
            try:
                task = add_task(tasks, spec, env, where)
            except ShoalError as exc:
                raise prefix_error(exc, where) from None
            if split == "fitness":
                sizes[task.name] = len(task)
    return sizes
