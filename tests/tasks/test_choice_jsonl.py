"""Multiple choice by log-likelihood and JSONL tasks, against independent computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_fixtures import make_model, make_tokenizer

from shoal.errors import TaskError
from shoal.tasks.choice import ChoiceTask, choice_logprobs
from shoal.tasks.jsonl import exact_match
from shoal.tasks.registry import TaskEnv, build_task

PROMPTS = ["Q: the cat is", "Q: one two", "Q: the dog is", "the"]
CHOICES = [["red", "green blue"], ["three", "one", "two"], ["blue", "red"], ["cat dog", "dog"]]


def _reference_logprob(model, tok, prompt: str, choice: str) -> float:
    """One sequence at a time, no padding, an explicit loop over the choice tokens."""
    p = tok(prompt)["input_ids"]
    c = tok(choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    total = 0.0
    for k, token in enumerate(c):
        row = logits[len(p) + k - 1]
        total += float(row[token] - torch.logsumexp(row, dim=0))
    return total


def test_choice_logprobs_match_unbatched_reference():
    model, tok = make_model(1), make_tokenizer()
    got = choice_logprobs(model, tok, PROMPTS, CHOICES, batch_size=3)
    for i, (prompt, opts) in enumerate(zip(PROMPTS, CHOICES, strict=True)):
        for j, c in enumerate(opts):
            assert got[i][0, j] == pytest.approx(
                _reference_logprob(model, tok, prompt, c), abs=1e-4
            )
            assert got[i][1, j] == len(c.split())


@pytest.mark.parametrize("normalize", [False, True])
def test_choice_task_scores_argmax(normalize):
    model, tok = make_model(2), make_tokenizer()
    ref = [
        np.array([_reference_logprob(model, tok, p, c) for c in opts])
        / (np.array([len(c.split()) for c in opts]) if normalize else 1.0)
        for p, opts in zip(PROMPTS, CHOICES, strict=True)
    ]
    picks = [int(np.argmax(r)) for r in ref]
    answers = [0, 1, 1, 0]
    task = ChoiceTask(
        "mc", PROMPTS, CHOICES, answers, tok, batch_size=2, length_normalize=normalize
    )
    expected = np.array([float(p == a) for p, a in zip(picks, answers, strict=True)])
    assert np.array_equal(task.score(model), expected)
    # answering with the model's own picks scores 1 everywhere
    own = ChoiceTask("mc", PROMPTS, CHOICES, picks, tok, length_normalize=normalize)
    assert np.all(own.score(model) == 1.0)


def test_exact_match():
    assert exact_match(" 42 ", 42) == 1.0
    assert exact_match("Cat", "cat") == 0.0
    assert exact_match("Cat", "cat", ignore_case=True) == 1.0


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_choice_task_with_text_or_index_answers(tmp_path):
    rows = [
        {"q": p, "opts": c, "gold": c[0] if i % 2 else 0}
        for i, (p, c) in enumerate(zip(PROMPTS, CHOICES, strict=True))
    ]
    _write(tmp_path / "mc.jsonl", rows)
    env = TaskEnv(tokenizer=make_tokenizer(), root=str(tmp_path))
    task = build_task(
        {
            "type": "jsonl",
            "path": "mc.jsonl",
            "prompt_key": "q",
            "answer_key": "gold",
            "choices_key": "opts",
        },
        env,
    )
    assert task.name == "mc" and len(task) == 4 and isinstance(task, ChoiceTask)
    assert task.answers == [0, 0, 0, 0]
    model = make_model(3)
    picks = [int(np.argmax(a[0])) for a in choice_logprobs(model, env.tokenizer, PROMPTS, CHOICES)]
    assert np.array_equal(task.score(model), np.array([float(p == 0) for p in picks]))


def test_jsonl_generation_task_exact_match(tmp_path):
    model, tok = make_model(4), make_tokenizer()
    rows = [{"prompt": p, "answer": "x"} for p in PROMPTS]
    _write(tmp_path / "gen.jsonl", rows)
    task = build_task(
        {"type": "jsonl", "path": str(tmp_path / "gen.jsonl"), "max_new_tokens": 3, "limit": 3},
        TaskEnv(tokenizer=tok),
    )
    assert len(task) == 3
    answers = task.answers(model)  # type: ignore[attr-defined]
    # scoring = exact match of each generated answer with the row's answer
    assert np.array_equal(task.score(model), np.zeros(3))
    rows = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, answers, strict=False)]
    _write(tmp_path / "gen2.jsonl", rows)
    task2 = build_task(
        {"type": "jsonl", "path": str(tmp_path / "gen2.jsonl"), "max_new_tokens": 3},
        TaskEnv(tokenizer=tok),
    )
    assert np.array_equal(task2.score(model), np.ones(3))


def test_jsonl_errors_name_file_and_line(tmp_path):
    env = TaskEnv(tokenizer=make_tokenizer(), root=str(tmp_path))
    with pytest.raises(TaskError, match=r"missing\.jsonl: task data file not found"):
        build_task({"type": "jsonl", "path": "missing.jsonl"}, env)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "answer": 1}\nnot json\n')
    with pytest.raises(TaskError, match=r"bad\.jsonl:2: not a JSON line"):
        build_task({"type": "jsonl", "path": "bad.jsonl"}, env)
    _write(tmp_path / "noans.jsonl", [{"prompt": "a"}])
    with pytest.raises(TaskError, match=r"noans\.jsonl:1: no answer under 'answer'"):
        build_task({"type": "jsonl", "path": "noans.jsonl"}, env)
    _write(tmp_path / "mc.jsonl", [{"prompt": "a", "answer": "zzz", "choices": ["red"]}])
    with pytest.raises(TaskError, match=r"mc\.jsonl:1: answer 'zzz' is neither"):
        build_task({"type": "jsonl", "path": "mc.jsonl", "choices_key": "choices"}, env)
    with pytest.raises(TaskError, match="needs a tokenizer"):
        build_task({"type": "jsonl", "path": "mc.jsonl"}, TaskEnv(root=str(tmp_path)))
