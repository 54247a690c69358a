"""Greedy batched generation against a step-by-step reference, and GenerationTask scoring."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from shoal.errors import TaskError
from shoal.tasks.generation import GenerationTask, extract_answer, generate_answers
from shoal.testbed.sizes import SIZES
from shoal.testbed.tokenizer import train_tokenizer
from shoal.testbed.train import make_model

PROMPTS = [
    "Q: 1 + 2 =\nA:",
    "Q: Spell this word backward: cat\nA:",
    "Q: gcd?\nA:",
    "Q: a much longer prompt that needs padding on the left side of the batch\nA:",
    "Q: 7\nA:",
]


@pytest.fixture(scope="module")
def lm() -> tuple[Any, Any]:
    corpus = [p + " answer " + str(i) for i, p in enumerate(PROMPTS * 20)]
    tokenizer = train_tokenizer(corpus, 300)
    model = make_model(SIZES["tiny"], tokenizer, torch.Generator().manual_seed(0))
    model.eval()
    return model, tokenizer


def _reference_greedy(model: Any, tokenizer: Any, prompt: str, max_new: int) -> str:
    """One prompt, no padding, no cache: append the argmax token until eos."""
    ids = tokenizer(prompt)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            token = int(torch.argmax(logits))
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_batched_generation_matches_reference(lm: tuple[Any, Any], batch_size: int) -> None:
    model, tokenizer = lm
    got = generate_answers(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=batch_size)
    want = [_reference_greedy(model, tokenizer, p, 6) for p in PROMPTS]
    assert got == want


def test_generation_stops_at_eos() -> None:
    corpus = ["Q: x\nA: y"] * 10
    tokenizer = train_tokenizer(corpus, 280)
    model = make_model(SIZES["tiny"], tokenizer, torch.Generator().manual_seed(1))
    # force the output head to always prefer eos: the continuation must be empty
    with torch.no_grad():
        model.lm_head.weight.zero_()
        bias = torch.zeros(len(tokenizer))
        bias[tokenizer.eos_token_id] = 1.0
        model.lm_head.bias = torch.nn.Parameter(bias)
    assert generate_answers(model, tokenizer, ["Q: x\nA:"] * 3, max_new_tokens=5) == [""] * 3


def test_extract_answer() -> None:
    assert extract_answer(" 42\nQ: next question") == "42"
    assert extract_answer("  abc  ") == "abc"
    assert extract_answer("") == ""


def test_task_scores_per_example(lm: tuple[Any, Any]) -> None:
    model, tokenizer = lm
    examples = [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)]
    answers = [
        extract_answer(a) for a in generate_answers(model, tokenizer, PROMPTS, max_new_tokens=4)
    ]

    # a scorer that is right exactly on examples with even id, using the real answer
    def scorer(answer: str, example: dict[str, Any]) -> float:
        assert answer == answers[example["id"]]
        return 1.0 if example["id"] % 2 == 0 else 0.25

    task = GenerationTask("toy", examples, scorer, max_new_tokens=4, batch_size=2)
    scores = task.score(model, tokenizer)
    assert scores.shape == (len(PROMPTS),)
    assert scores.dtype == np.float64
    np.testing.assert_array_equal(scores, [1.0, 0.25, 1.0, 0.25, 1.0])
    assert len(task) == 5


def test_task_errors(lm: tuple[Any, Any]) -> None:
    model, _ = lm
    with pytest.raises(TaskError, match="example 1"):
        GenerationTask("bad", [{"prompt": "a"}, {"text": "b"}], lambda a, e: 1.0)
    task = GenerationTask("t", [{"prompt": "Q: 1\nA:"}], lambda a, e: 2.0, max_new_tokens=2)
    with pytest.raises(TaskError, match="no tokenizer"):
        task.score(model)
    with pytest.raises(TaskError, match="outside"):
        task.score_answers(["1"])
    with pytest.raises(TaskError, match="2 answers"):
        task.score_answers(["1", "2"])
    with pytest.raises(TaskError, match="max_new_tokens"):
        generate_answers(model, object(), ["x"], max_new_tokens=0)
