"""Two-pass inference with SVF experts, and its evaluation (Transformer², METHODS.md §5).

The first pass decides which z a prompt gets; the second answers with W′ built from it.

- ``prompt``: the base model (z = 1) is asked which skill the prompt needs, with
  :data:`ROUTER_TEMPLATE`; the first word of its answer that names a skill picks that
  expert; ``other`` or no skill word at all keeps the base (z = 1).
- ``classifier``: a dedicated SVF expert, trained with the supervised objective to
  answer the name of a prompt's skill (:func:`train_classifier`, inputs written with
  :data:`CLASSIFIER_TEMPLATE`), names the skill; parsed as above.
- ``fewshot``: per target task, z′ = Σ_k α_k z_k (:func:`~shoal.adapt.expert.mix_z`, per
  model or per matrix) with α found by the cross-entropy method on a few examples of the
  task, ranked by their score and, among equal scores, by the mean per-token
  log-likelihood of the correct answers (:func:`fewshot_search`, :func:`fewshot_mix`).
- ``fewshot-unseen``: the same search over the *other* skills' experts only, so each skill
  in turn is a task no expert was trained on (the paper's adaptation to unseen tasks).
- ``oracle`` (each prompt gets its own skill's expert) and ``base`` (z = 1) are the
  references.

:func:`evaluate_strategy` scores one strategy on the test tasks of every skill: the
accuracy per skill and the mean over skills. The few-shot examples are the first
``fewshot.examples`` of each skill's validation task, never its test task.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shoal.adapt.cem import CEM, CEMBest
from shoal.adapt.config import OTHER, ClassifierConfig, FewshotConfig, TrainConfig
from shoal.adapt.expert import mix_z
from shoal.adapt.svf import AdaptError
from shoal.adapt.train import TrainResult, answer_logprobs, train_expert, validation_score
from shoal.tasks.generation import GenerationTask, extract_answer, generate_answers

if TYPE_CHECKING:  # pragma: no cover
    from shoal.adapt.config import AdaptConfig
    from shoal.adapt.svf import SVFModel

__all__ = [
    "CLASSIFIER_TEMPLATE",
    "ROUTER_TEMPLATE",
    "STRATEGIES",
    "EvalResult",
    "classifier_examples",
    "evaluate_strategy",
    "fewshot_mix",
    "fewshot_search",
    "load_experts",
    "parse_skill",
    "route",
    "run_eval",
    "train_classifier",
]

Z = dict[str, torch.Tensor]
#: the strategies :func:`evaluate_strategy` knows
STRATEGIES = ("prompt", "classifier", "fewshot", "fewshot-unseen", "oracle", "base")

#: the first pass of the prompt strategy, asked of the base model
ROUTER_TEMPLATE = (
    "Which skill does this question need? Answer with one word: {skills} or other.\n"
    "Question: {prompt}\n"
    "Skill:"
)
#: the classifier expert's input; it is trained to continue with " <skill>"
CLASSIFIER_TEMPLATE = "Classify: {prompt}\nSkill:"

# a word: letters, digits and the characters skill names may hold
_WORD = re.compile(r"[A-Za-z0-9_.\-]+")


def parse_skill(text: str, skills: Sequence[str]) -> str | None:
    """The skill a first-pass answer names, or ``None`` for ``other`` / nothing usable.

    The answer's first line is split into words (letters, digits, ``_ . -``; trailing
    dots dropped); the first word that is a skill name or ``other``, compared without
    case, decides.

    Args:
        text: The generated continuation.
        skills: The experts' skill names.

    Returns:
        The skill name as spelled in ``skills``, or ``None``.
    """
    by_lower = {s.lower(): s for s in skills}
    for word in _WORD.findall(extract_answer(text)):
        w = word.rstrip(".").lower()
        if w == OTHER:
            return None
        if w in by_lower:
            return by_lower[w]
    return None


def _generate(
    svf: SVFModel, tokenizer: Any, inputs: Sequence[str], z: Z | None, max_new_tokens: int
) -> list[str]:
    with svf.using_z(z), svf.cached():
        return generate_answers(svf.model, tokenizer, list(inputs), max_new_tokens=max_new_tokens)


def _name_tokens(tokenizer: Any, skills: Sequence[str]) -> int:
    """Tokens enough for ``" <skill>"`` and end-of-sequence, whichever skill."""
    longest = max(len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in skills)
    return max(longest, len(tokenizer(" " + OTHER, add_special_tokens=False)["input_ids"])) + 1


def route(
    svf: SVFModel,
    tokenizer: Any,
    prompts: Sequence[str],
    skills: Sequence[str],
    *,
    strategy: str,
    classifier_z: Z | None = None,
    generate: Callable[[Sequence[str]], list[str]] | None = None,
) -> tuple[list[str | None], list[str]]:
    """The first pass of the ``prompt`` or ``classifier`` strategy.

    Args:
        svf: The wrapped base model; its z is restored afterwards.
        tokenizer: Its tokenizer.
        prompts: The task prompts.
        skills: The experts' skills.
        strategy: ``"prompt"`` (base weights, :data:`ROUTER_TEMPLATE`) or
            ``"classifier"`` (``classifier_z``, :data:`CLASSIFIER_TEMPLATE`).
        classifier_z: The classifier expert's z.
        generate: Replaces greedy generation (``inputs -> texts``; it runs with the
            first pass's z set), e.g. in tests.

    Returns:
        ``(choices, texts)``: the chosen skill per prompt (``None``: base) and the raw
        first-pass answers.
    """
    if strategy == "prompt":
        listed = ", ".join(skills)
        inputs = [ROUTER_TEMPLATE.format(skills=listed, prompt=p) for p in prompts]
        z = None
    elif strategy == "classifier":
        if classifier_z is None:
            raise AdaptError("the classifier strategy needs the classifier expert's z")
        inputs = [CLASSIFIER_TEMPLATE.format(prompt=p) for p in prompts]
        z = classifier_z
    else:
        raise AdaptError(f"route: strategy {strategy!r} has no first pass (prompt, classifier)")
    if generate is None:
        texts = _generate(svf, tokenizer, inputs, z, _name_tokens(tokenizer, skills))
    else:
        with svf.using_z(z):
            texts = list(generate(inputs))
    return [parse_skill(t, skills) for t in texts], texts


# -- the classifier expert -------------------------------------------------------------------
def _exact(answer: str, example: dict[str, Any]) -> float:
    return float(answer.strip().lower() == str(example["answer"]).lower())


def classifier_examples(
    tasks: Mapping[str, Any], per_skill: int | None = None
) -> list[dict[str, Any]]:
    """The classifier's data: each skill's prompts, written with
    :data:`CLASSIFIER_TEMPLATE` and labelled with the skill's name.

    Args:
        tasks: Skill → a :class:`~shoal.tasks.generation.GenerationTask` of that skill.
        per_skill: The first ``per_skill`` prompts of each (``None``: all).

    Returns:
        ``{"prompt": ..., "answer": skill}`` rows, skills interleaved in config order.
    """
    per: dict[str, list[dict[str, Any]]] = {}
    for skill, task in tasks.items():
        if not isinstance(task, GenerationTask):
            raise AdaptError(f"skill {skill!r}: the classifier needs generation tasks")
        prompts = task.prompts()[:per_skill] if per_skill is not None else task.prompts()
        per[skill] = [
            {"prompt": CLASSIFIER_TEMPLATE.format(prompt=p), "answer": skill} for p in prompts
        ]
    rows: list[dict[str, Any]] = []
    for i in range(max((len(v) for v in per.values()), default=0)):
        rows.extend(v[i] for v in per.values() if i < len(v))
    return rows


def train_classifier(
    svf: SVFModel,
    tokenizer: Any,
    train_tasks: Mapping[str, Any],
    val_tasks: Mapping[str, Any],
    options: ClassifierConfig,
    progress: bool = True,
) -> TrainResult:
    """Train the classifier expert (supervised: the answer is the skill's name).

    Its train data are the first ``options.examples`` train prompts of every skill, its
    validation data the validation prompts; the z of the best validation accuracy is
    kept. ``svf`` is left at that z.
    """
    skills = list(train_tasks)
    n_tok = _name_tokens(tokenizer, skills)
    train = GenerationTask(
        "classifier/train",
        classifier_examples(train_tasks, options.examples),
        _exact,
        max_new_tokens=n_tok,
        tokenizer=tokenizer,
    )
    val = GenerationTask(
        "classifier/validation",
        classifier_examples(val_tasks),
        _exact,
        max_new_tokens=n_tok,
        tokenizer=tokenizer,
    )
    opts = TrainConfig(
        objective="supervised",
        steps=options.steps,
        batch_size=options.batch_size,
        lr=options.lr,
        eval_every=options.eval_every,
        patience=options.patience,
        seed=options.seed,
        answer_key="answer",
        answer_prefix=" ",
    )
    svf.reset_z()
    return train_expert(svf, tokenizer, train, val, opts, progress, label="classifier")


# -- few-shot ----------------------------------------------------------------------------------
def fewshot_search(
    evaluate: Callable[[np.ndarray], tuple[float, float]],
    num_experts: int,
    options: FewshotConfig,
    *,
    num_matrices: int = 1,
) -> CEMBest:
    """Run the CEM over α for ``options.iterations`` iterations.

    Args:
        evaluate: ``alpha -> (score, tie_break)``, higher is better for both.
        num_experts: K.
        options: Population, elite ratio, initial std, iterations, seed.
        num_matrices: M for per-matrix α (1: per model).

    Returns:
        The best α seen, with its score.
    """
    cem = CEM(
        num_experts,
        num_matrices=num_matrices,
        population=options.population,
        elite_ratio=options.elite_ratio,
        init_std=options.init_std,
        seed=options.seed,
    )
    for _ in range(options.iterations):
        alphas = cem.ask()
        told = [evaluate(a) for a in alphas]
        cem.tell([s for s, _ in told], [t for _, t in told])
    assert cem.best is not None  # at least one iteration ran
    return cem.best


def fewshot_mix(
    svf: SVFModel,
    tokenizer: Any,
    experts: Mapping[str, Z],
    task: GenerationTask,
    options: FewshotConfig,
    *,
    answer_key: str = "answer",
    answer_prefix: str = " ",
) -> tuple[Z, CEMBest]:
    """Find α for one target task from a few of its examples; return z′ and the search.

    Each candidate α is scored by the task's own greedy score on ``task`` (the few
    examples) with z′ = Σ_k α_k z_k set, its tie-break the mean per-token
    log-likelihood of the gold answers under z′.

    Returns:
        ``(z′, best)``: the mixture of the best α, and the CEM's record of it.
    """
    zs = list(experts.values())
    if not zs:
        raise AdaptError("fewshot: no experts to mix")
    try:
        gold = [str(e[answer_key]) for e in task.examples]
    except KeyError:
        raise AdaptError(f"task {task.name!r}: no gold answer under {answer_key!r}") from None
    prompts = task.prompts()
    num_matrices = len(zs[0]) if options.per == "matrix" else 1

    def evaluate(alpha: np.ndarray) -> tuple[float, float]:
        z = mix_z(zs, alpha, options.per)
        with svf.using_z(z):
            score = validation_score(svf, task, tokenizer)
            with svf.cached():
                logp, counts = answer_logprobs(svf, tokenizer, prompts, gold, prefix=answer_prefix)
        return score, float(logp.sum() / counts.sum().clamp_min(1))

    best = fewshot_search(evaluate, len(zs), options, num_matrices=num_matrices)
    return mix_z(zs, best.alpha, options.per), best


# -- evaluation --------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """One strategy's test accuracy.

    Attributes:
        strategy: Its name.
        per_skill: Skill → mean test score.
        routed: Skill → {chosen skill (``"base"`` for none) → count} (first-pass
            strategies; empty for the others).
        alphas: Skill → the few-shot α (``fewshot``: one weight per expert;
            ``fewshot-unseen``: one per other skill's expert).
    """

    strategy: str
    per_skill: dict[str, float]
    routed: dict[str, dict[str, int]] = field(default_factory=dict)
    alphas: dict[str, list[float]] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        """Mean over skills (each skill counts once, whatever its size)."""
        return float(np.mean(list(self.per_skill.values()))) if self.per_skill else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "strategy": self.strategy,
            "per_skill": self.per_skill,
            "mean": self.mean,
            "routed": self.routed,
            "alphas": self.alphas,
        }

    def __str__(self) -> str:  # for logs
        return json.dumps(self.to_dict())


def _score_with(svf: SVFModel, tokenizer: Any, task: GenerationTask, z: Z | None) -> np.ndarray:
    with svf.using_z(z), svf.cached():
        return task.score(svf.model, tokenizer)


def evaluate_strategy(
    svf: SVFModel,
    tokenizer: Any,
    experts: Mapping[str, Z],
    test_tasks: Mapping[str, Any],
    strategy: str,
    *,
    classifier_z: Z | None = None,
    fewshot_tasks: Mapping[str, GenerationTask] | None = None,
    fewshot: FewshotConfig | None = None,
    answer_key: str = "answer",
    answer_prefix: str = " ",
) -> EvalResult:
    """Score one strategy on every skill's test task.

    Args:
        svf: The wrapped base model (its z is restored afterwards).
        tokenizer: Its tokenizer.
        experts: Skill → z of its expert.
        test_tasks: Skill → its test :class:`~shoal.tasks.generation.GenerationTask`.
        strategy: One of :data:`STRATEGIES`.
        classifier_z: The classifier expert (``classifier``).
        fewshot_tasks: Skill → the few examples α is fitted on (``fewshot``).
        fewshot: CEM options (``fewshot``).
        answer_key: Gold answers' key (the few-shot tie-break).
        answer_prefix: Text before a gold answer.

    Returns:
        The :class:`EvalResult`.
    """
    if strategy not in STRATEGIES:
        raise AdaptError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if strategy in ("oracle", "prompt", "classifier"):
        missing = [s for s in test_tasks if s not in experts]
        if strategy == "oracle" and missing:
            raise AdaptError(f"oracle: no expert for skill {missing[0]!r}")
    result = EvalResult(strategy, {})
    skills = list(experts)
    for skill, raw in test_tasks.items():
        task = raw
        if not isinstance(task, GenerationTask):
            raise AdaptError(f"skill {skill!r}: test task must be a generation task")
        if strategy == "base":
            scores = _score_with(svf, tokenizer, task, None)
        elif strategy == "oracle":
            scores = _score_with(svf, tokenizer, task, experts[skill])
        elif strategy in ("fewshot", "fewshot-unseen"):
            if fewshot_tasks is None or skill not in fewshot_tasks:
                raise AdaptError(f"{strategy}: no few-shot examples for skill {skill!r}")
            pool = dict(experts)
            if strategy == "fewshot-unseen":  # the skill's own expert is left out
                pool.pop(skill, None)
            z, best = fewshot_mix(
                svf,
                tokenizer,
                pool,
                fewshot_tasks[skill],
                fewshot or FewshotConfig(),
                answer_key=answer_key,
                answer_prefix=answer_prefix,
            )
            result.alphas[skill] = [float(a) for a in best.alpha]
            scores = _score_with(svf, tokenizer, task, z)
        else:
            choices, _ = route(
                svf, tokenizer, task.prompts(), skills, strategy=strategy, classifier_z=classifier_z
            )
            scores = np.zeros(len(task))
            counts: dict[str, int] = {}
            for chosen in [*skills, None]:
                rows = [i for i, c in enumerate(choices) if c == chosen]
                counts[chosen or "base"] = len(rows)
                if not rows:
                    continue
                sub = dataclasses.replace(task, examples=[task.examples[i] for i in rows])
                got = _score_with(svf, tokenizer, sub, None if chosen is None else experts[chosen])
                scores[rows] = got
            result.routed[skill] = {k: v for k, v in counts.items() if v}
        result.per_skill[skill] = float(np.mean(scores)) if len(scores) else 0.0
    return result


# -- from a config -----------------------------------------------------------------------------
def load_experts(experts_dir: str | Path, svf: SVFModel, skills: Sequence[str]) -> dict[str, Z]:
    """Skill → z of ``experts_dir/<skill>/expert.safetensors`` (as ``shoal adapt train``
    writes them), each checked against the base.

    Raises:
        AdaptError: A missing expert file, or one trained on another base.
        CheckpointError: A corrupt expert file.
    """
    from shoal.adapt.expert import load_expert

    out = {}
    for skill in skills:
        path = Path(experts_dir) / skill / "expert.safetensors"
        if not path.is_file():
            raise AdaptError(f"{path}: no expert for skill {skill!r} (shoal adapt train)")
        expert = load_expert(path, svf, apply=False)
        if expert.skill != skill:
            raise AdaptError(f"{path}: holds the expert of skill {expert.skill!r}, not {skill!r}")
        out[skill] = expert.z
    return out


def run_eval(
    config: AdaptConfig,
    experts_dir: str | Path | None,
    strategies: Sequence[str],
    *,
    classifier: str | Path | None = None,
) -> list[EvalResult]:
    """Evaluate strategies as ``shoal adapt eval`` does.

    Args:
        config: The adapt config (base, tasks, few-shot options).
        experts_dir: Folder with ``<skill>/expert.safetensors`` (not needed for ``base``).
        strategies: Names from :data:`STRATEGIES`.
        classifier: The classifier expert file (default
            ``experts_dir/classifier/expert.safetensors``).

    Returns:
        One :class:`EvalResult` per strategy, in the order given.
    """
    from shoal.adapt.expert import load_expert
    from shoal.adapt.train import build_tasks, load_wrapped
    from shoal.errors import RecipeError

    for s in strategies:
        if s not in STRATEGIES:
            raise RecipeError(f"--strategy {s!r}: use one of {', '.join(STRATEGIES)}")
    svf, tokenizer = load_wrapped(config)
    experts: dict[str, Z] = {}
    if any(s != "base" for s in strategies):
        if experts_dir is None:
            raise RecipeError("--experts: give the folder of trained experts")
        experts = load_experts(experts_dir, svf, config.skills)
    classifier_z = None
    if "classifier" in strategies:
        path = Path(classifier) if classifier else Path(str(experts_dir)) / "classifier"
        if path.is_dir():
            path = path / "expert.safetensors"
        if not path.is_file():
            raise AdaptError(f"{path}: no classifier expert (shoal adapt train --classifier)")
        classifier_z = load_expert(path, svf, apply=False).z
    test = build_tasks(config, tokenizer, "test")
    fewshot_tasks: dict[str, GenerationTask] = {}
    if {"fewshot", "fewshot-unseen"} & set(strategies):
        for skill, task in build_tasks(config, tokenizer, "validation").items():
            if not isinstance(task, GenerationTask):
                raise AdaptError(f"skill {skill!r}: few-shot needs a generation task")
            few = task.examples[: config.fewshot.examples]
            fewshot_tasks[skill] = dataclasses.replace(task, examples=few)
    return [
        evaluate_strategy(
            svf,
            tokenizer,
            experts,
            test,
            s,
            classifier_z=classifier_z,
            fewshot_tasks=fewshot_tasks,
            fewshot=config.fewshot,
            answer_key=config.train.answer_key,
            answer_prefix=config.train.answer_prefix,
        )
        for s in strategies
    ]
