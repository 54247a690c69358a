"""Two-pass strategies by mechanism: the parser, the first pass's z, the few-shot search.

Whether a strategy beats the base is not a property of tiny models, so these tests check
what each part does: the parser on hand-written answers, routing under the right z with a
stand-in first pass, and α recovered where the experts are hand-made z vectors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from test_adapt_train import SKILLS, ToyWorld, make_toy_world

from shoal.adapt.config import FewshotConfig
from shoal.adapt.expert import mix_z
from shoal.adapt.svf import wrap_svf
from shoal.adapt.two_pass import (
    CLASSIFIER_TEMPLATE,
    ROUTER_TEMPLATE,
    classifier_examples,
    evaluate_strategy,
    fewshot_mix,
    fewshot_search,
    parse_skill,
    route,
)
from shoal.tasks.generation import GenerationTask

SK = ["chain_sum", "gcd", "spell_backward"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> ToyWorld:
    torch.set_num_threads(1)
    return make_toy_world(tmp_path_factory.mktemp("toy"))


@pytest.mark.parametrize(
    ("text", "skill"),
    [
        (" gcd", "gcd"),
        (" GCD.", "gcd"),
        ("gcd\nchain_sum", "gcd"),  # only the first line counts
        (" I think chain_sum, maybe gcd", "chain_sum"),  # the first skill word wins
        (" spell_backward!", "spell_backward"),
        (" other", None),
        (" Other than gcd", None),  # 'other' came first
        (" chain", None),  # a part of a name is not the name
        (" banana", None),
        ("", None),
        ("\ngcd", None),
    ],
)
def test_parse_skill(text: str, skill: str | None) -> None:
    assert parse_skill(text, SK) == skill


def _zs(svf: Any, seed: int, k: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{n: 2 * torch.rand(r, generator=g) for n, r in svf.lengths().items()} for _ in range(k)]


def test_first_pass_runs_under_its_z_and_the_answer_under_the_chosen_expert(
    world: ToyWorld,
) -> None:
    svf = wrap_svf(world.model())
    clf, e_first, e_last = _zs(svf, 0, 3)
    seen: list[tuple[list[str], dict[str, torch.Tensor]]] = []

    def stand_in(inputs: Any) -> list[str]:
        seen.append((list(inputs), svf.get_z()))
        # a perfect classifier: it reads the skill word off the prompt
        return [" first" if " first " in s else " last" if " last " in s else " ?" for s in inputs]

    prompts = ["Q: first 1 2 3\nA:", "Q: last 4 5 6\nA:", "Q: middle 7 8 9\nA:"]
    choices, texts = route(
        svf,
        world.tokenizer,
        prompts,
        list(SKILLS),
        strategy="classifier",
        classifier_z=clf,
        generate=stand_in,
    )
    assert choices == ["first", "last", None] and texts == [" first", " last", " ?"]
    inputs, z_during = seen[0]
    assert inputs == [CLASSIFIER_TEMPLATE.format(prompt=p) for p in prompts]
    assert all(torch.equal(z_during[n], clf[n]) for n in clf)
    assert all(torch.equal(v, torch.ones_like(v)) for v in svf.get_z().values())  # restored
    # the prompt strategy asks the base (z = 1) with the router template
    route(svf, world.tokenizer, prompts, list(SKILLS), strategy="prompt", generate=stand_in)
    inputs, z_during = seen[1]
    assert inputs[0] == ROUTER_TEMPLATE.format(skills="first, last", prompt=prompts[0])
    assert all(torch.equal(v, torch.ones_like(v)) for v in z_during.values())
    # second pass: each routed prompt is answered with its expert's z; compare with
    # scoring every prompt under each z directly
    task = GenerationTask(
        "mix",
        [{"prompt": p, "answer": "1"} for p in prompts],
        lambda a, e: float(a == e["answer"]),
        max_new_tokens=3,
        tokenizer=world.tokenizer,
    )
    answers = {}
    for name, z in (("first", e_first), ("last", e_last), (None, None)):
        with svf.using_z(z):
            answers[name] = task.answers(svf.model)
    expected = [answers["first"][0], answers["last"][1], answers[None][2]]
    scorer_seen: list[str] = []
    task.scorer = lambda a, e: scorer_seen.append(a) or 0.0  # type: ignore[assignment]
    import shoal.adapt.two_pass as tp

    real = tp.route
    try:
        tp.route = lambda *a, **k: (["first", "last", None], [])  # type: ignore[assignment]
        evaluate_strategy(
            svf,
            world.tokenizer,
            {"first": e_first, "last": e_last},
            {"mixed": task},
            "classifier",
            classifier_z=clf,
        )
    finally:
        tp.route = real  # type: ignore[assignment]
    assert sorted(scorer_seen) == sorted(expected)


def test_classifier_data_labels_prompts_with_their_skill(world: ToyWorld) -> None:
    tasks = {
        s: GenerationTask(s, world.examples[s][:3], lambda a, e: 0.0, tokenizer=world.tokenizer)
        for s in SKILLS
    }
    rows = classifier_examples(tasks, per_skill=2)
    assert [r["answer"] for r in rows] == ["first", "last", "first", "last"]
    assert rows[1]["prompt"] == CLASSIFIER_TEMPLATE.format(
        prompt=world.examples["last"][0]["prompt"]
    )


def test_fewshot_search_breaks_ties_by_the_second_number() -> None:
    """Scores on a coarse grid tie for every α near the target; only the tie-break (the
    exact distance) can lead the search to it."""
    target = np.array([0.3, 0.8])

    def evaluate(alpha: np.ndarray) -> tuple[float, float]:
        d = float(np.abs(alpha - target).sum())
        return float(d < 0.5), -d

    opts = FewshotConfig(iterations=15, seed=1)
    best = fewshot_search(evaluate, 2, opts)
    np.testing.assert_allclose(best.alpha, target, atol=0.03)
    assert best.score == 1.0


def test_fewshot_mix_recovers_a_known_mixture(world: ToyWorld) -> None:
    """The gold answers of a few prompts are what the α* = (0.3, 0.8) mixture of two
    hand-made experts answers; CEM over α finds a mixture that answers them all. (α*
    itself is not the target: the likelihood of greedy answers, the tie-break, grows with
    a sharper mixture, so the search ends near α* but not on it.)"""
    svf = wrap_svf(world.model())
    experts = dict(zip(("a", "b"), _zs(svf, 3, 2), strict=True))
    alpha_star = np.array([0.3, 0.8])
    prompts = [e["prompt"] for e in world.examples["first"][:10]]
    probe = GenerationTask(
        "few",
        [{"prompt": p, "answer": ""} for p in prompts],
        lambda a, e: 0.0,
        max_new_tokens=3,
        tokenizer=world.tokenizer,
    )
    with svf.using_z(mix_z(list(experts.values()), alpha_star)):
        gold = probe.answers(svf.model)
    task = GenerationTask(
        "few",
        [{"prompt": p, "answer": g} for p, g in zip(prompts, gold, strict=True)],
        lambda a, e: float(a == e["answer"]),
        max_new_tokens=3,
        tokenizer=world.tokenizer,
    )
    with svf.using_z(None):
        base_acc = float(np.mean(task.score(svf.model)))
    z, best = fewshot_mix(
        svf, world.tokenizer, experts, task, FewshotConfig(population=16, iterations=8, seed=0)
    )
    assert base_acc < 1.0  # the base does not already answer like the mixture
    assert best.score == 1.0
    with svf.using_z(z):
        assert task.answers(svf.model) == gold
    assert np.abs(best.alpha - alpha_star).max() < 0.25
    for n, v in mix_z(list(experts.values()), best.alpha).items():
        assert torch.equal(z[n], v)


def test_fewshot_unseen_leaves_each_skills_own_expert_out(world: ToyWorld) -> None:
    """Each skill is adapted from the other skills' experts only: the mixture has one
    weight fewer, and it is built from exactly those experts."""
    import shoal.adapt.two_pass as tp

    svf = wrap_svf(world.model())
    experts = dict(zip(SKILLS, _zs(svf, 5, len(SKILLS)), strict=True))
    tasks = {
        s: GenerationTask(
            s, world.examples[s][:4], lambda a, e: 0.0, max_new_tokens=3, tokenizer=world.tokenizer
        )
        for s in SKILLS
    }
    pools: dict[str, list[str]] = {}
    real = tp.fewshot_mix

    def spy(svf_: Any, tok: Any, pool: dict, task: GenerationTask, *a: Any, **k: Any) -> Any:
        pools[task.name] = list(pool)
        return real(svf_, tok, pool, task, *a, **k)

    opts = FewshotConfig(population=8, iterations=2, seed=0)
    try:
        tp.fewshot_mix = spy  # type: ignore[assignment]
        result = evaluate_strategy(
            svf,
            world.tokenizer,
            experts,
            tasks,
            "fewshot-unseen",
            fewshot_tasks=tasks,
            fewshot=opts,
        )
    finally:
        tp.fewshot_mix = real  # type: ignore[assignment]
    assert pools == {s: [o for o in SKILLS if o != s] for s in SKILLS}
    assert all(len(result.alphas[s]) == len(SKILLS) - 1 for s in SKILLS)
