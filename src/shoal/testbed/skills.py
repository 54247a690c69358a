"""The skills of the testbed: reasoning-gym generators, prompt format, scorers.

Each skill is one ``reasoning_gym`` dataset with a fixed configuration. An
example is stored as a plain dict (one JSON line) with the generator's
``question``, ``answer`` and ``metadata`` plus the ``prompt`` the models see:
``"Q: <question>\\nA:"``; a model is trained to continue it with
``" <answer>"`` and the end-of-sequence token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.errors import TaskError

__all__ = [
    "SKILLS",
    "SkillScorer",
    "SkillSpec",
    "draw_examples",
    "format_prompt",
    "make_splits",
    "split_seed",
    "terse_example",
]

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class SkillSpec:
    """One skill: which reasoning-gym generator, with which settings.

    Attributes:
        name: The skill's name, also the reasoning-gym dataset name.
        config: Keyword arguments for ``reasoning_gym.create_dataset``.
        max_new_tokens: Enough tokens for any answer of this skill.
        drop_answers: Answers whose items are never drawn: a constant answer that a
            model could learn instead of the skill (gcd's ``"1"``, six items in ten).
    """

    name: str
    config: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 8
    drop_answers: tuple[str, ...] = ()


# Settings that a 1.5M-parameter Llama learns in a few hundred steps (h3 probe):
# short prompts, short answers, and skills that do not help one another.
SKILLS: dict[str, SkillSpec] = {
    "chain_sum": SkillSpec(
        "chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}, 6
    ),
    "spell_backward": SkillSpec("spell_backward", {"min_word_len": 3, "max_word_len": 5}, 8),
    # coprime pairs (answer 1) are 61 % of gcd's draws: a base that always says "1"
    # would score as well as an expert, so they are left out
    "gcd": SkillSpec("gcd", {"min_value": 1, "max_value": 50}, 6, drop_answers=("1",)),
}


def format_prompt(question: str) -> str:
    """The prompt a model sees for ``question``: ``"Q: <question>\\nA:"``."""
    return f"Q: {question}\nA:"


def terse_example(skill: str, example: dict[str, Any]) -> dict[str, Any]:
    """``example`` with a short prompt instead of the generator's sentence.

    ``"Q: 66 + 69\\nA:"``, ``"Q: rev graff\\nA:"``, ``"Q: gcd 33 21\\nA:"``: the form
    a base model learns the skills in, so that an expert only has to learn the
    sentence a user asks in (as instruction tuning maps requests onto what
    pretraining taught) -- a small edit, which merges (docs/testbed.md).
    """
    meta = example["metadata"]
    if skill == "chain_sum":
        question = str(meta["expression"])
    elif skill == "spell_backward":
        question = f"rev {meta['word']}"
    elif skill == "gcd":
        question = "gcd " + " ".join(str(n) for n in meta["numbers"])
    else:
        raise TaskError(f"no terse form for skill {skill!r}")
    return dict(example, prompt=format_prompt(question))


def split_seed(seed: int, skill: str, split: str) -> int:
    """The reasoning-gym seed of one split of one skill, distinct per split.

    Derived with ``np.random.SeedSequence`` from the root seed, the skill's
    position in :data:`SKILLS` and the split's position, so every (skill, split)
    draws from its own stream.
    """
    names = list(SKILLS)
    if skill not in SKILLS:
        raise TaskError(f"unknown skill {skill!r}; known: {', '.join(names)}")
    seq = np.random.SeedSequence([seed, names.index(skill), SPLITS.index(split)])
    return int(seq.generate_state(1, dtype=np.uint32)[0])


@functools.cache
def _dataset(skill: str) -> Any:
    """A one-item dataset of ``skill``, only for its ``score_answer``."""
    import reasoning_gym

    spec = SKILLS[skill]
    return reasoning_gym.create_dataset(spec.name, size=1, seed=0, **spec.config)


def draw_examples(
    skill: str, n: int, seed: int, *, exclude: set[str] | None = None, unique: bool = False
) -> list[dict[str, Any]]:
    """Draw ``n`` examples of ``skill`` from reasoning-gym with ``seed``.

    Args:
        skill: A key of :data:`SKILLS`.
        n: How many examples to return.
        seed: The generator's seed.
        exclude: Questions to skip (items of other splits).
        unique: Also skip questions already drawn.

    Returns:
        ``n`` dicts with ``question``, ``answer``, ``prompt`` and ``metadata``.

    Raises:
        TaskError: If the generator cannot supply ``n`` acceptable questions.
    """
    import json

    import reasoning_gym

    if skill not in SKILLS:
        raise TaskError(f"unknown skill {skill!r}; known: {', '.join(SKILLS)}")
    spec = SKILLS[skill]
    skip = set(exclude or ())
    pool = n * 5 + 64  # room for the items that are skipped
    data = reasoning_gym.create_dataset(spec.name, size=pool, seed=seed, **spec.config)
    out: list[dict[str, Any]] = []
    for i in range(pool):
        item = data[i]
        question = item["question"]
        if question in skip or str(item["answer"]) in spec.drop_answers:
            continue
        if unique:
            skip.add(question)
        # JSON round trip now, so that in-memory and reloaded examples are equal
        meta = json.loads(json.dumps(item.get("metadata", {}), default=str))
        out.append(
            {
                "question": question,
                "answer": str(item["answer"]),
                "prompt": format_prompt(question),
                "metadata": meta,
            }
        )
        if len(out) == n:
            return out
    raise TaskError(
        f"skill {skill!r}: only {len(out)} of {n} questions left after removing "
        f"{len(exclude or ())} held-out ones; use a smaller split"
    )


def make_splits(skill: str, seed: int, sizes: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    """Train / validation / test examples of one skill, held out from each other.

    The test split is drawn first with distinct questions; validation skips
    every test question; train skips every held-out question (repeats within
    train are kept: they are the distribution). Each split has its own seed
    (:func:`split_seed`).

    Args:
        skill: A key of :data:`SKILLS`.
        seed: The testbed's root seed.
        sizes: Number of examples per split name.

    Returns:
        A dict ``split -> list of examples``.
    """
    test = draw_examples(skill, sizes["test"], split_seed(seed, skill, "test"), unique=True)
    held = {e["question"] for e in test}
    validation = draw_examples(
        skill, sizes["validation"], split_seed(seed, skill, "validation"), exclude=held, unique=True
    )
    held |= {e["question"] for e in validation}
    train = draw_examples(skill, sizes["train"], split_seed(seed, skill, "train"), exclude=held)
    return {"train": train, "validation": validation, "test": test}


class SkillScorer:
    """Exact match of an answer under the skill generator's own ``score_answer``.

    reasoning-gym's ``score_answer`` gives partial credit to some answers (a
    prefix of the reversed word, the right number inside a longer string); the
    testbed counts only full credit, so a score is 1.0 or 0.0. Pass
    ``partial=True`` to keep the generator's own value instead.

    Instances are picklable (they hold only the skill's name), so a task can
    travel to worker processes.
    """

    def __init__(self, skill: str, *, partial: bool = False) -> None:
        if skill not in SKILLS:
            raise TaskError(f"unknown skill {skill!r}; known: {', '.join(SKILLS)}")
        self.skill = skill
        self.partial = partial

    def __call__(self, answer: str, example: dict[str, Any]) -> float:
        """Score one extracted answer against its example, in [0, 1]."""
        value = float(_dataset(self.skill).score_answer(answer, example))
        if self.partial:
            return min(max(value, 0.0), 1.0)
        return 1.0 if value >= 1.0 else 0.0

    def __repr__(self) -> str:
        return f"SkillScorer({self.skill!r}, partial={self.partial})"
