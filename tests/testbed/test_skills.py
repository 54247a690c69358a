"""Skills: held-out splits, seeds, and the exact-match scorer on hand-made answers."""

from __future__ import annotations

import pickle

import pytest

from shoal.errors import TaskError
from shoal.testbed.skills import (
    SKILLS,
    SkillScorer,
    draw_examples,
    format_prompt,
    make_splits,
    split_seed,
    terse_example,
)

SIZES = {"train": 300, "validation": 40, "test": 40}


@pytest.mark.parametrize("skill", list(SKILLS))
def test_splits_are_held_out_and_sized(skill: str) -> None:
    splits = make_splits(skill, 0, SIZES)
    assert {k: len(v) for k, v in splits.items()} == SIZES
    q = {k: [e["question"] for e in v] for k, v in splits.items()}
    # held-out splits have distinct questions and share none with each other or with train
    assert len(set(q["test"])) == len(q["test"])
    assert len(set(q["validation"])) == len(q["validation"])
    assert not set(q["test"]) & set(q["validation"])
    assert not set(q["train"]) & (set(q["test"]) | set(q["validation"]))


def test_split_seeds_differ_and_repeat() -> None:
    seeds = {split_seed(0, s, p) for s in SKILLS for p in ("train", "validation", "test")}
    assert len(seeds) == 3 * len(SKILLS)
    assert split_seed(3, "gcd", "test") == split_seed(3, "gcd", "test")
    assert split_seed(3, "gcd", "test") != split_seed(4, "gcd", "test")


def test_same_seed_same_examples() -> None:
    a = make_splits("chain_sum", 7, SIZES)
    b = make_splits("chain_sum", 7, SIZES)
    c = make_splits("chain_sum", 8, SIZES)
    assert a == b
    assert a["test"] != c["test"]


def test_example_fields_and_prompt() -> None:
    (ex,) = draw_examples("gcd", 1, 123)
    assert ex["prompt"] == f"Q: {ex['question']}\nA:"
    assert format_prompt("x?") == "Q: x?\nA:"
    a, b = ex["metadata"]["numbers"]
    import math

    assert ex["answer"] == str(math.gcd(a, b))  # the generator is what we think it is


def test_gcd_draws_no_coprime_pairs() -> None:
    """gcd's constant answer "1" (61 % of raw draws) is left out of every split."""
    import math

    splits = make_splits("gcd", 0, SIZES)
    for rows in splits.values():
        for ex in rows:
            a, b = ex["metadata"]["numbers"]
            assert math.gcd(a, b) >= 2 and ex["answer"] == str(math.gcd(a, b))


def test_unknown_skill_and_exhausted_generator() -> None:
    with pytest.raises(TaskError, match="nope"):
        draw_examples("nope", 1, 0)
    with pytest.raises(TaskError, match="nope"):
        SkillScorer("nope")
    # gcd with values 1..50 has at most 50*50 distinct questions
    with pytest.raises(TaskError, match="gcd"):
        draw_examples("gcd", 2600, 0, unique=True)


@pytest.mark.parametrize(
    ("skill", "answer", "truth", "exact", "partial"),
    [
        ("chain_sum", "134", "134", 1.0, 1.0),
        ("chain_sum", "0134", "134", 1.0, 1.0),  # the generator tolerates leading zeros
        ("chain_sum", "-4", "-4", 1.0, 1.0),
        ("chain_sum", "4", "-4", 0.0, 0.0),
        ("chain_sum", "", "7", 0.0, 0.0),
        ("spell_backward", "olleh", "olleh", 1.0, 1.0),
        ("spell_backward", "OLLEH", "olleh", 1.0, 1.0),  # case-insensitive
        ("spell_backward", "olle", "olleh", 0.0, 0.8),  # 4 of 5 leading letters
        ("spell_backward", "xlleh", "olleh", 0.0, 0.8),
        ("gcd", "6", "6", 1.0, 1.0),
        ("gcd", "16", "6", 0.0, 0.5),  # the right digits inside a longer answer
        ("gcd", "3", "6", 0.0, 0.0),
    ],
)
def test_scorer_on_hand_made_answers(
    skill: str, answer: str, truth: str, exact: float, partial: float
) -> None:
    example = {"question": "?", "answer": truth, "prompt": "Q: ?\nA:", "metadata": {}}
    assert SkillScorer(skill)(answer, example) == exact
    assert SkillScorer(skill, partial=True)(answer, example) == pytest.approx(partial)


def test_scorer_pickles() -> None:
    scorer = pickle.loads(pickle.dumps(SkillScorer("gcd", partial=True)))
    assert scorer("16", {"answer": "6"}) == pytest.approx(0.5)


def test_terse_form_asks_the_same_question_in_a_few_tokens() -> None:
    """The base's pretraining form: same operands, same answer, a short prompt."""
    for skill in SKILLS:
        (ex,) = draw_examples(skill, 1, 7)
        short = terse_example(skill, ex)
        assert short["answer"] == ex["answer"] and short["question"] == ex["question"]
        assert short["prompt"].startswith("Q: ") and short["prompt"].endswith("\nA:")
        assert len(short["prompt"]) < len(ex["prompt"]) / 2
        meta = ex["metadata"]
        body = short["prompt"][3:-3]
        if skill == "chain_sum":  # the expression, whose value is the answer
            a, op, b = body.split()
            assert str(int(a) + int(b) if op == "+" else int(a) - int(b)) == ex["answer"]
        elif skill == "spell_backward":
            assert body == f"rev {meta['word']}" and ex["answer"] == meta["word"][::-1]
        else:
            assert body == "gcd " + " ".join(map(str, meta["numbers"]))
    with pytest.raises(TaskError, match="no terse form"):
        terse_example("sudoku", {"metadata": {}})
