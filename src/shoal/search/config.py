"""The run configuration of ``shoal evolve``: a pydantic schema, one doc string per field.

A config names the source models, the loader of the resident model, the tasks (fitness
and held-out test), the algorithm (or a list of ``stages``), a budget, the executor and a
seed. Unknown keys are errors naming their location; ``--set a.b=3`` overrides are parsed
as YAML scalars and applied before validation. Relative paths are resolved against
``root`` (default: the directory of the config file).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shoal._yaml import safe_dump, safe_load
from shoal.errors import RecipeError
from shoal.recipe.load import absolute_root, read_settings, settings_error

__all__ = [
    "Budget",
    "ExecutorConfig",
    "LoaderConfig",
    "RunConfig",
    "StageConfig",
    "TasksConfig",
    "apply_overrides",
    "load_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Budget(_Strict):
    """When a run (or stage) stops; the first limit reached wins. Checked between batches."""

    evaluations: int | None = Field(default=None, ge=1, description="Most candidate evaluations.")
    seconds: float | None = Field(
        default=None, gt=0, description="Most wall-clock seconds of search."
    )
    target: float | None = Field(
        default=None,
        description="Stop once the best fitness (mean over fitness tasks) reaches this.",
    )


class LoaderConfig(_Strict):
    """How a worker builds its resident model (the one every candidate is merged into)."""

    type: Literal["hf-causal-lm", "hf-vlm", "diffusers-model", "callable"] = Field(
        default="hf-causal-lm",
        description="hf-causal-lm: transformers AutoModelForCausalLM from a model dir; "
        "hf-vlm: a vision-language model (AutoModelForImageTextToText, e.g. LLaVA) from a "
        "model dir, whose language part recipes may merge with causal LMs (docs/vlm.md); "
        "diffusers-model: a diffusers model (e.g. UNet2DModel) from its folder, or a "
        "pipeline folder's unet (docs/diffusion.md); "
        "callable: `target` returns any torch.nn.Module (or (module, tokenizer)).",
    )
    model: str | None = Field(
        default=None,
        description="hf-causal-lm / hf-vlm / diffusers-model: model name (or path, relative "
        "to the config "
        "file) to load; default base, else first.",
    )
    target: str | None = Field(default=None, description="callable: 'package.module:function'.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for `target`."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Parameter dtype of the resident model."
    )

    @model_validator(mode="after")
    def _target_for_callable(self) -> LoaderConfig:
        if self.type == "callable" and not self.target:
            raise ValueError("loader.type callable needs loader.target ('module:function')")
        return self


class TasksConfig(_Strict):
    """Task specs by split; each spec is a mapping with a ``type`` (see ``shoal.tasks``)."""

    fitness: list[dict[str, Any]] = Field(
        default=..., min_length=1, description="Tasks the search optimises (per-example scores)."
    )
    validation: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Held-out tasks for choosing between runs (seeds, settings), scored "
        "only for the final best and the baselines; never seen by the search.",
    )
    test: list[dict[str, Any]] = Field(
        default_factory=list, description="Held-out tasks, scored only for the final best."
    )


class ExecutorConfig(_Strict):
    """Where candidates are evaluated."""

    type: Literal["serial", "process", "ray"] = Field(
        default="serial", description="Executor kind."
    )
    workers: int = Field(default=2, ge=1, description="Worker processes / Ray actors.")
    address: str | None = Field(
        default=None,
        description="ray: cluster address for ray.init(address=...); None starts a local one.",
    )
    connect_timeout: float = Field(
        default=30.0, gt=0, description="ray: seconds the cluster address has to answer."
    )
    device: str = Field(default="cpu", description="Torch device of the resident model.")
    max_retries: int = Field(
        default=2, ge=0, description="Times a work item is retried after a crash."
    )
    gpus_per_worker: float = Field(default=0.0, ge=0, description="ray: GPUs per actor.")


class StageConfig(_Strict):
    """One stage of a multi-stage run; its result becomes a model named after the stage.

    A stage searches (``algorithm``) or is a fixed step (``merge``: a recipe file, one
    document or several as mergekit-multi writes them, run as ``shoal merge`` does).
    """

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Stage (and model) name.")
    algorithm: dict[str, Any] | None = Field(
        default=None, description="Algorithm block: name + options."
    )
    merge: str | None = Field(
        default=None,
        description=(
            "A recipe file run as a fixed step (several YAML documents with `name:` are "
            "mergekit-multi stages); relative to the config file. Its model names may be "
            "models of the config or earlier stages."
        ),
    )
    budget: Budget | None = Field(
        default=None, description="Budget of this stage (default: run's)."
    )

    @model_validator(mode="after")
    def _search_or_merge(self) -> StageConfig:
        if (self.algorithm is None) == (self.merge is None):
            raise ValueError(f"stage {self.name!r}: give exactly one of `algorithm` or `merge`")
        if self.merge is not None and self.budget is not None:
            raise ValueError(f"stage {self.name!r}: a `merge` step has no budget")
        return self


class RunConfig(_Strict):
    """A whole ``shoal evolve`` run."""

    models: dict[str, str] = Field(
        default_factory=dict, description="Source model name -> path (HF dir or .safetensors)."
    )
    base_model: str | None = Field(default=None, description="Name of the common ancestor, if any.")
    loader: LoaderConfig = Field(
        default_factory=lambda: LoaderConfig(), description="Resident model."
    )
    tasks: TasksConfig = Field(..., description="Fitness and test tasks.")
    algorithm: dict[str, Any] | None = Field(
        default=None, description="Algorithm block: `name` plus that algorithm's options."
    )
    stages: list[StageConfig] | None = Field(
        default=None,
        min_length=1,
        description="Several algorithm blocks run in turn (instead of `algorithm`).",
    )
    budget: Budget = Field(default_factory=lambda: Budget(), description="Stop criteria.")
    executor: ExecutorConfig = Field(
        default_factory=lambda: ExecutorConfig(), description="Executor."
    )
    seed: int = Field(
        default=0, ge=0, description="Root seed: every random stream derives from it."
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Candidates asked per batch (None: the algorithm's natural size).",
    )
    baselines: bool | dict[str, dict[str, Any]] = Field(
        default=False,
        description=(
            "Also score every source model on all tasks for the summary; a mapping "
            "name -> recipe scores those recipes too (e.g. an untuned merge)."
        ),
    )
    progress: bool = Field(default=True, description="Show a rich progress bar.")
    checkpoint_seconds: float = Field(
        default=10.0,
        ge=0,
        description=(
            "Seconds between checkpoints (events, store and state made durable); 0: "
            "after every batch. A killed run replays the batches since the last "
            "checkpoint on --resume, to the same result."
        ),
    )
    root: str | None = Field(
        default=None,
        description="Directory relative paths resolve against (default: config's dir).",
    )

    @model_validator(mode="after")
    def _one_algorithm_source(self) -> RunConfig:
        if (self.algorithm is None) == (self.stages is None):
            raise ValueError("give exactly one of `algorithm` or `stages`")
        blocks = [b for _, _, b, _ in self.algorithm_blocks()]
        if self.stages and self.stages[-1].algorithm is None:  # the run's best is searched
            raise ValueError("stages: the last stage must search (an `algorithm`, not `merge`)")
        for block in blocks:
            if not isinstance(block.get("name"), str):
                raise ValueError("an algorithm block needs `name` (e.g. name: m2n2)")
        if self.stages is not None:
            names = [s.name for s in self.stages]
            if len(set(names)) != len(names):
                raise ValueError(f"stage names repeat: {names}")
            clash = set(names) & set(self.models)
            if clash:
                raise ValueError(f"stage names clash with model names: {sorted(clash)}")
        if self.base_model is not None and self.base_model not in self.models:
            raise ValueError(f"base_model {self.base_model!r} is not one of models")
        return self

    def resolve(self, path: str) -> Path:
        """``path`` made absolute against :attr:`root` (``~`` expanded)."""
        p = Path(path).expanduser()
        if p.is_absolute() or self.root is None:
            return p
        return Path(self.root) / p

    def algorithm_blocks(self) -> list[tuple[int, str | None, dict[str, Any], Budget]]:
        """``(stage index, stage name or None, algorithm block, budget)`` of every stage
        that searches, in order (``merge`` steps left out; the index counts them)."""
        if self.stages is None:
            return [(0, None, dict(self.algorithm or {}), self.budget)]
        return [
            (i, s.name, dict(s.algorithm), s.budget or self.budget)
            for i, s in enumerate(self.stages)
            if s.algorithm is not None
        ]

    def to_yaml(self) -> str:
        """The config as YAML (defaults filled in)."""
        return safe_dump(self.model_dump(mode="json"), sort_keys=False)  # '1e5' stays quoted


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {item!r}: expected key=value, e.g. budget.evaluations=100")
    try:
        value = safe_load(raw) if raw.strip() else None  # 1e-3 is a number, as in files
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested mapping, in place.

    Integer path parts index lists (``stages.0.budget.evaluations=5``); missing mappings are
    created. Returns ``data``.
    """
    for item in overrides:
        keys, value = _parse_override(item)
        node: Any = data
        for i, key in enumerate(keys[:-1]):
            where = ".".join(keys[: i + 1])
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise RecipeError(f"--set {item}: {where} is not an index of the list")
                node = node[int(key)]
            elif isinstance(node, dict):
                if node.get(key) is None:
                    node[key] = {}
                node = node[key]
            else:
                raise RecipeError(f"--set {item}: {where} is not a mapping")
        last = keys[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise RecipeError(f"--set {item}: {last} is not an index of the list")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(f"--set {item}: cannot set {last} inside a scalar")
    return data


def load_config(
    source: str | Path | Mapping[str, Any],
    overrides: Sequence[str] = (),
    *,
    root: str | Path | None = None,
) -> RunConfig:
    """Read, override and validate a run config.

    Args:
        source: A YAML file path or an already parsed mapping.
        overrides: ``key.path=value`` strings (``--set``), values parsed as YAML scalars.
        root: Directory for relative paths; default the file's directory (or the CWD for a
            mapping). A ``root`` key in the config wins; a relative one is taken
            relative to that directory.

    Raises:
        RecipeError: Unreadable YAML, unknown key, bad value; the message names the file and
            the key path.
    """
    data, name, folder = read_settings(source, root)
    apply_overrides(data, overrides)
    absolute_root(data, folder)
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise settings_error(exc, name) from None
    # model paths are made absolute once so the resolved config is self-contained
    config.models = {k: str(config.resolve(v)) for k, v in config.models.items()}
    for stage in config.stages or []:
        if stage.merge is not None:
            stage.merge = str(config.resolve(stage.merge))
    model = config.loader.model
    if model is not None and model not in config.models and config.resolve(model).exists():
        config.loader.model = str(config.resolve(model))  # a path, not a name
    return config
