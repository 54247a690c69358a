"""Opening a built testbed: model paths, skills, data splits and tasks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.errors import TaskError
from shoal.tasks.generation import GenerationTask
from shoal.testbed.build import FORMAT_VERSION, expert_name
from shoal.testbed.skills import SPLITS, SkillScorer

__all__ = ["Testbed", "load_testbed"]


@dataclass(frozen=True)
class Testbed:
    """A built testbed on disk.

    Attributes:
        root: The testbed directory.
        skills: Skill names, in build order.
        base: Path of the base model's Hugging Face directory.
        experts: Skill name -> path of that skill's expert.
        meta: The parsed ``testbed.json``.
    """

    root: Path
    skills: tuple[str, ...]
    base: Path
    experts: dict[str, Path]
    meta: dict[str, Any] = field(repr=False)

    def models(self) -> dict[str, Path]:
        """Every model by name: ``"base"`` first, then ``"expert-<skill>"``."""
        out = {"base": self.base}
        out.update({expert_name(s): p for s, p in self.experts.items()})
        return out

    def examples(self, skill: str, split: str = "test") -> list[dict[str, Any]]:
        """The examples of one split of one skill, as stored."""
        self._check(skill, split)
        path = self.root / "data" / skill / f"{split}.jsonl"
        if not path.is_file():
            raise TaskError(f"{path}: data split missing from the testbed")
        rows = []
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise TaskError(f"{path}:{n}: not a JSON line ({exc.msg})") from None
        return rows

    def tokenizer(self) -> Any:
        """The shared tokenizer (loaded from the base model's directory)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.base)

    def task(
        self,
        skill: str,
        split: str = "test",
        *,
        limit: int | None = None,
        batch_size: int = 64,
        device: str | None = None,
        partial: bool = False,
        tokenizer: Any = None,
    ) -> GenerationTask:
        """A :class:`GenerationTask` scoring a model on one split of one skill.

        Args:
            skill: One of :attr:`skills`.
            split: ``"train"``, ``"validation"`` or ``"test"``.
            limit: Keep only the first ``limit`` examples.
            batch_size: Prompts per generation batch.
            device: Where to generate; ``None`` means the model's device.
            partial: Keep reasoning-gym's partial credit instead of exact match.
            tokenizer: Tokenizer to attach; defaults to the testbed's own.

        Returns:
            The task, with the testbed's tokenizer attached.
        """
        examples = self.examples(skill, split)
        if limit is not None:
            examples = examples[:limit]
        max_new = int(self.meta["skill_specs"][skill]["max_new_tokens"])
        return GenerationTask(
            name=f"{skill}/{split}",
            examples=examples,
            scorer=SkillScorer(skill, partial=partial),
            prompt_key="prompt",
            max_new_tokens=max_new,
            batch_size=batch_size,
            tokenizer=tokenizer if tokenizer is not None else self.tokenizer(),
            device=device,
        )

    def _check(self, skill: str, split: str) -> None:
        if skill not in self.skills:
            raise TaskError(f"{self.root}: no skill {skill!r}; has {', '.join(self.skills)}")
        if split not in SPLITS:
            raise TaskError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def load_testbed(path: str | Path) -> Testbed:
    """Open the testbed in ``path`` (written by :func:`build_testbed`).

    Raises:
        TaskError: If ``testbed.json`` is missing or malformed, or a model
            directory it names is missing.
    """
    root = Path(path)
    meta_path = root / "testbed.json"
    if not meta_path.is_file():
        raise TaskError(f"{meta_path}: not found; is {root} a testbed (shoal testbed build)?")
    try:
        meta = json.loads(meta_path.read_text())
        version = meta["format_version"]
        skills = tuple(meta["skills"])
        models = meta["models"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise TaskError(f"{meta_path}: malformed testbed metadata ({exc})") from None
    if version != FORMAT_VERSION:
        raise TaskError(f"{meta_path}: format_version {version}, expected {FORMAT_VERSION}")
    paths: dict[str, Path] = {}
    for name in ["base", *(expert_name(s) for s in skills)]:
        if name not in models:
            raise TaskError(f"{meta_path}: model {name!r} not listed")
        model_dir = root / models[name]["path"]
        if not (model_dir / "config.json").is_file():
            raise TaskError(f"{model_dir}: model directory missing or incomplete")
        paths[name] = model_dir
    return Testbed(
        root=root,
        skills=skills,
        base=paths["base"],
        experts={s: paths[expert_name(s)] for s in skills},
        meta=meta,
    )
