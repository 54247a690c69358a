"""Scoring every model of a testbed on every skill: the report table."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal._atomic import write_text_atomic
from shoal._devices import resolve_device
from shoal.testbed.load import load_testbed

__all__ = ["TestbedReport", "report_testbed"]


@dataclass(frozen=True)
class TestbedReport:
    """Mean score (in percent) of every model on every skill.

    Attributes:
        root: The testbed directory.
        split: The split scored.
        models: Model names, rows of the table.
        skills: Skill names, columns of the table.
        scores: ``scores[model][skill]``: mean exact-match score, 0-100.
        per_example: ``per_example[model][skill]``: every example's score, 0-1.
        n: Examples per skill.
        seconds: Wall time of the scoring.
    """

    root: Path
    split: str
    models: tuple[str, ...]
    skills: tuple[str, ...]
    scores: dict[str, dict[str, float]]
    per_example: dict[str, dict[str, list[float]]] = field(repr=False)
    n: dict[str, int]
    seconds: float

    def own_skill_margins(self) -> dict[str, float]:
        """Per skill: its expert's score minus the base's, in points."""
        return {
            s: self.scores[f"expert-{s}"][s] - self.scores["base"][s]
            for s in self.skills
            if f"expert-{s}" in self.scores
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as written to ``report.json``."""
        return {
            "split": self.split,
            "models": list(self.models),
            "skills": list(self.skills),
            "scores": self.scores,
            "own_skill_margins": self.own_skill_margins(),
            "n": self.n,
            "seconds": round(self.seconds, 2),
            "per_example": self.per_example,
        }

    def to_markdown(self) -> str:
        """The table as GitHub markdown (exact match, percent)."""
        head = "| model | " + " | ".join(self.skills) + " |"
        rule = "|---|" + "---:|" * len(self.skills)
        lines = [
            f"Exact match (%) on the {self.split} split "
            f"({', '.join(f'{s}: n={self.n[s]}' for s in self.skills)}).",
            "",
            head,
            rule,
        ]
        for model in self.models:
            cells = []
            for skill in self.skills:
                value = f"{self.scores[model][skill]:.1f}"
                if model == f"expert-{skill}":
                    value = f"**{value}**"
                cells.append(value)
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def report_testbed(
    path: str | Path,
    *,
    split: str = "test",
    device: str | None = None,
    batch_size: int = 64,
    write: bool = True,
) -> TestbedReport:
    """Score every model (base, experts) on every skill of a testbed.

    Args:
        path: A testbed directory.
        split: Which split to score.
        device: Where to run the models (default CPU).
        batch_size: Prompts per generation batch.
        write: Also write ``report.json`` and ``report.md`` into ``path``
            (``report-<split>.*`` for a split other than test).

    Returns:
        The table, with per-example scores.
    """
    from transformers import AutoModelForCausalLM

    resolve_device(device)
    started = time.perf_counter()
    bed = load_testbed(path)
    tokenizer = bed.tokenizer()
    tasks = {
        s: bed.task(s, split, batch_size=batch_size, device=device, tokenizer=tokenizer)
        for s in bed.skills
    }
    scores: dict[str, dict[str, float]] = {}
    per_example: dict[str, dict[str, list[float]]] = {}
    for name, model_dir in bed.models().items():
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        if device is not None:
            model = model.to(device)  # type: ignore[arg-type]
        scores[name], per_example[name] = {}, {}
        for skill, task in tasks.items():
            values = task.score(model)
            per_example[name][skill] = [float(v) for v in values]
            scores[name][skill] = round(100.0 * float(values.mean()), 2) if len(values) else 0.0
    report = TestbedReport(
        root=bed.root,
        split=split,
        models=tuple(bed.models()),
        skills=bed.skills,
        scores=scores,
        per_example=per_example,
        n={s: len(t) for s, t in tasks.items()},
        seconds=time.perf_counter() - started,
    )
    if write:
        stem = "report" if split == "test" else f"report-{split}"
        write_text_atomic(bed.root / f"{stem}.json", json.dumps(report.to_dict(), indent=1) + "\n")
        write_text_atomic(bed.root / f"{stem}.md", report.to_markdown())
    return report
