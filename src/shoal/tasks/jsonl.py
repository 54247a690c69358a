"""Tasks from a JSONL file: one example per line.

``type: jsonl`` with ``path``. Rows hold a prompt and an answer. If ``choices_key`` names a
list in each row, the task is multiple choice by log-likelihood (:mod:`shoal.tasks.choice`)
and the answer is the correct choice's index or text; otherwise the model generates
greedily and the example scores 1 when its answer (first line, stripped) equals the row's
answer (``exact``), optionally ignoring case.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from shoal.errors import TaskError
from shoal.tasks.base import Task
from shoal.tasks.choice import ChoiceTask
from shoal.tasks.generation import GenerationTask
from shoal.tasks.registry import TaskEnv, TaskOptions, register_task_type

__all__ = ["JsonlOptions", "exact_match", "jsonl_rows", "read_jsonl"]


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSONL file; errors name the
    file and the line (a missing file, a line that is no JSON object)."""
    if not path.is_file():
        raise TaskError(f"{path}: task data file not found")
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskError(f"{path}:{n}: not a JSON line ({exc.msg})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{n}: expected a JSON object")
            yield n, row


def read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL file (blank lines skipped); errors name file and line."""
    rows: list[dict[str, Any]] = []
    for _, row in jsonl_rows(path):
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise TaskError(f"{path}: no examples")
    return rows


def exact_match(answer: str, expected: Any, *, ignore_case: bool = False) -> float:
    """1.0 if ``answer`` equals ``str(expected)`` after stripping (and casefolding)."""
    a, b = answer.strip(), str(expected).strip()
    if ignore_case:
        a, b = a.casefold(), b.casefold()
    return float(a == b)


def _score_row(answer: str, example: dict[str, Any], *, key: str, ignore_case: bool) -> float:
    return exact_match(answer, example[key], ignore_case=ignore_case)


class JsonlOptions(TaskOptions):
    """Fields of ``type: jsonl``."""

    path: str = Field(..., description="The JSONL file (relative to the config's root).")
    prompt_key: str = Field(default="prompt", description="Key of the prompt string.")
    answer_key: str = Field(
        default="answer", description="Key of the answer (text, or choice index)."
    )
    choices_key: str | None = Field(
        default=None, description="Key of a list of choices: multiple choice."
    )
    limit: int | None = Field(default=None, ge=1, description="Use only the first `limit` rows.")
    ignore_case: bool = Field(default=False, description="Exact match ignoring case.")
    max_new_tokens: int = Field(default=16, ge=1, description="Generation length.")
    batch_size: int = Field(
        default=32, ge=1, description="Prompts (or choice sequences) per batch."
    )
    length_normalize: bool = Field(
        default=False, description="Choices ranked by mean token log-prob."
    )
    tokenizer: str | None = Field(
        default=None, description="Tokenizer dir (default: the worker's)."
    )
    mode: Literal["auto", "generate", "choice"] = Field(
        default="auto", description="auto: choice when choices_key is set."
    )


def _choice_index(row: dict[str, Any], opts: list[str], key: str, where: str) -> int:
    ans = row.get(key)
    if isinstance(ans, bool) or ans is None:
        raise TaskError(f"{where}: no answer under {key!r}")
    if isinstance(ans, int):
        return ans
    if str(ans) in opts:
        return opts.index(str(ans))
    raise TaskError(f"{where}: answer {ans!r} is neither an index nor one of the choices")


@register_task_type("jsonl", JsonlOptions)
def build_jsonl(o: JsonlOptions, env: TaskEnv) -> Task:
    """Build a generation or multiple-choice task from a JSONL file."""
    path = env.resolve(o.path)
    rows = read_jsonl(path, o.limit)
    name = o.name or path.stem
    tokenizer = env.get_tokenizer(o.tokenizer)
    choice = o.mode == "choice" or (o.mode == "auto" and o.choices_key is not None)
    for n, row in enumerate(rows, 1):
        if not isinstance(row.get(o.prompt_key), str):
            raise TaskError(f"{path}:{n}: no string under {o.prompt_key!r}")
        if o.answer_key not in row:
            raise TaskError(f"{path}:{n}: no answer under {o.answer_key!r}")
    if choice:
        key = o.choices_key or "choices"
        prompts, choices, answers = [], [], []
        for n, row in enumerate(rows, 1):
            opts = row.get(key)
            if not isinstance(opts, list) or not opts:
                raise TaskError(f"{path}:{n}: no list of choices under {key!r}")
            opts = [str(c) for c in opts]
            prompts.append(row[o.prompt_key])
            choices.append(opts)
            answers.append(_choice_index(row, opts, o.answer_key, f"{path}:{n}"))
        return ChoiceTask(
            name=name,
            prompts=prompts,
            choices=choices,
            answers=answers,
            tokenizer=tokenizer,
            batch_size=o.batch_size,
            length_normalize=o.length_normalize,
        )
    return GenerationTask(
        name=name,
        examples=rows,
        scorer=partial(_score_row, key=o.answer_key, ignore_case=o.ignore_case),
        prompt_key=o.prompt_key,
        max_new_tokens=o.max_new_tokens,
        batch_size=o.batch_size,
        tokenizer=tokenizer,
        device=None,
    )
