"""The configuration of ``shoal adapt``: a pydantic schema, one doc string per field.

An adapt config names the base model, one set of tasks per skill (train, validation and
test splits, each a task spec as evolve configs write them), which matrices SVF adapts,
how the z vectors are trained and how the few-shot mixture is searched. Defaults are
METHODS.md §5's where the paper gives one. Unknown keys are errors naming the file and
the key; relative paths resolve against the config file's folder.

Example::

    base: ../.testbed/small/base
    tasks:
      gcd:
        train:      {type: testbed, dir: ../.testbed/small, skill: gcd, split: train}
        validation: {type: testbed, dir: ../.testbed/small, skill: gcd, split: validation}
        test:       {type: testbed, dir: ../.testbed/small, skill: gcd, split: test}
    train: {objective: reinforce, steps: 200, batch_size: 64}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shoal._yaml import safe_dump
from shoal.errors import RecipeError, TaskError
from shoal.recipe.load import absolute_root, read_settings, settings_error

__all__ = [
    "AdaptConfig",
    "ClassifierConfig",
    "FewshotConfig",
    "MatricesConfig",
    "SkillTasks",
    "TrainConfig",
    "load_adapt_config",
]

#: the word the prompt strategy's first pass answers when no expert fits
OTHER = "other"
#: the folder name (and expert skill) of the classifier strategy's expert
CLASSIFIER = "classifier"
SPLITS = ("train", "validation", "test")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SkillTasks(_Strict):
    """The three splits of one skill; each is a task spec (a mapping with ``type``)."""

    train: dict[str, Any] = Field(..., description="Examples the z vector is trained on.")
    validation: dict[str, Any] = Field(
        ..., description="Scored every `train.eval_every` steps; the best z is kept."
    )
    test: dict[str, Any] = Field(..., description="Held out; scored only by `shoal adapt eval`.")


class MatricesConfig(_Strict):
    """Which weight matrices get a z vector (METHODS.md §5: the MLP ones by default)."""

    mlp: bool = Field(default=True, description="Adapt the MLP matrices of every block.")
    attention: bool = Field(default=False, description="Adapt the attention matrices too.")


class TrainConfig(_Strict):
    """How one expert's z vector is trained (METHODS.md §5)."""

    objective: Literal["reinforce", "supervised"] = Field(
        default="reinforce",
        description="reinforce: sampled answers, reward +1/-1, KL penalty (the paper); "
        "supervised: next-token cross-entropy on the gold answers (the ablation).",
    )
    steps: int = Field(default=200, ge=1, description="Most optimiser steps.")
    batch_size: int = Field(default=256, ge=1, description="Prompts per step (the paper: 256).")
    lr: float = Field(default=2e-3, gt=0, description="Peak AdamW learning rate (cosine to 0).")
    kl: float = Field(
        default=0.1, ge=0, description="λ of the KL(π_W′ ‖ π_W) penalty (paper: 0 to 0.3)."
    )
    clip: float = Field(default=1.0, gt=0, description="Gradient-norm clipping threshold.")
    eval_every: int = Field(
        default=10, ge=1, description="Steps between validation scores (also at 0 and the end)."
    )
    patience: int = Field(
        default=5,
        ge=1,
        description="Stop after this many validation scores in a row without improvement.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of batch order and sampling.")
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="Sampled answer length (default: the task's own)."
    )
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature.")
    answer_key: str = Field(
        default="answer",
        description="Key of the gold answer in the task's examples (supervised objective, "
        "few-shot tie-break).",
    )
    answer_prefix: str = Field(
        default=" ",
        description="Text between prompt and gold answer (the testbed's models answer "
        "'A: 12'; the answer ends with the end-of-sequence token).",
    )


class FewshotConfig(_Strict):
    """The few-shot strategy: CEM over mixing weights α (METHODS.md §5)."""

    examples: int = Field(
        default=10, ge=1, description="Examples of the target task α is scored on."
    )
    population: int = Field(default=32, ge=2, description="CEM candidates per iteration.")
    elite_ratio: float = Field(
        default=0.2, gt=0, le=1, description="Share of the population kept as elites."
    )
    iterations: int = Field(default=50, ge=1, description="CEM iterations (paper: 50-100).")
    init_std: float = Field(default=0.5, gt=0, description="Initial std of every α.")
    per: Literal["model", "matrix"] = Field(
        default="model", description="One α per expert, or one per expert and matrix."
    )
    seed: int = Field(default=0, ge=0, description="Seed of the CEM.")


class ClassifierConfig(_Strict):
    """The classifier strategy's own SVF expert, trained (supervised) to name a prompt's
    skill; its data are the train (and validation) prompts of every skill."""

    examples: int = Field(
        default=200, ge=1, description="Train prompts per skill the classifier learns from."
    )
    steps: int = Field(default=100, ge=1, description="Most optimiser steps.")
    batch_size: int = Field(default=32, ge=1, description="Prompts per step.")
    lr: float = Field(default=2e-3, gt=0, description="Peak AdamW learning rate.")
    eval_every: int = Field(default=10, ge=1, description="Steps between validation scores.")
    patience: int = Field(default=5, ge=1, description="Early stopping, as for experts.")
    seed: int = Field(default=0, ge=0, description="Seed of the batch order.")


class AdaptConfig(_Strict):
    """A whole ``shoal adapt`` setup."""

    base: str = Field(..., description="The base model: a Hugging Face causal-LM folder.")
    tasks: dict[str, SkillTasks] = Field(
        ..., min_length=1, description="Skill name -> its train, validation and test tasks."
    )
    matrices: MatricesConfig = Field(
        default_factory=lambda: MatricesConfig(), description="Matrices SVF adapts."
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(), description="Training of each expert."
    )
    fewshot: FewshotConfig = Field(
        default_factory=lambda: FewshotConfig(), description="The few-shot strategy."
    )
    classifier: ClassifierConfig = Field(
        default_factory=lambda: ClassifierConfig(), description="The classifier strategy."
    )
    cache_dir: str | None = Field(
        default=None,
        description="Folder of the SVD cache (computed once per base); None: no cache.",
    )
    device: str = Field(default="cpu", description="Torch device: cpu, cuda, cuda:1.")
    root: str | None = Field(
        default=None,
        description="Folder relative paths resolve against (default: the config's folder).",
    )

    @field_validator("tasks")
    @classmethod
    def _skill_names(cls, tasks: dict[str, SkillTasks]) -> dict[str, SkillTasks]:
        import re

        for name in tasks:
            # a skill names a folder of experts and a word the model answers with
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"skill name {name!r}: use letters, digits, _ . -")
            if name.lower() in (OTHER, CLASSIFIER):
                raise ValueError(
                    f"skill name {name!r} is reserved ('{OTHER}': no expert; "
                    f"'{CLASSIFIER}': the classifier expert's folder)"
                )
        lowered = [n.lower() for n in tasks]
        if len(set(lowered)) != len(lowered):
            raise ValueError("skill names must differ in more than case")
        return tasks

    @property
    def skills(self) -> list[str]:
        """The skill names, in config order."""
        return list(self.tasks)

    def resolve(self, path: str) -> Path:
        """``path`` made absolute against :attr:`root` (``~`` expanded, ``..`` folded)."""
        p = Path(path).expanduser()
        if p.is_absolute() or self.root is None:
            return Path(os.path.normpath(p))
        return Path(os.path.normpath(Path(self.root) / p))

    def to_yaml(self) -> str:
        """The config as YAML (defaults filled in)."""
        return safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_adapt_config(
    source: str | Path | Mapping[str, Any],
    *,
    root: str | Path | None = None,
    check_tasks: bool = True,
) -> AdaptConfig:
    """Read and validate an adapt config.

    Args:
        source: A YAML file or an already parsed mapping.
        root: Folder for relative paths; default the file's folder (the working
            directory for a mapping). A ``root`` key in the config wins; a relative one
            is taken relative to that folder.
        check_tasks: Check every task spec against its type's schema (the task types
            must be registered: the CLI imports ``shoal.executors.testbed_task``).

    Returns:
        The config, with ``root``, ``base`` and ``cache_dir`` absolute.

    Raises:
        RecipeError: Unreadable YAML, an unknown key, a bad value or a bad task spec;
            the message names the file and the key path.
    """
    data, name, folder = read_settings(source, root)
    absolute_root(data, folder)
    try:
        config = AdaptConfig.model_validate(data)
    except ValidationError as exc:
        raise settings_error(exc, name) from None
    config.base = str(config.resolve(config.base))
    if config.cache_dir is not None:
        config.cache_dir = str(config.resolve(config.cache_dir))
    if check_tasks:
        from shoal.tasks.registry import validate_task_spec

        for skill, splits in config.tasks.items():
            for split in SPLITS:
                where = f"tasks.{skill}.{split}"
                try:
                    validate_task_spec(getattr(splits, split), where)
                except TaskError as exc:
                    raise RecipeError(f"{name}: {exc}") from None
    return config
