"""The adapt config and the training driver, on a toy world built in seconds.

The toy world is a tiny Llama and a byte-level tokenizer, pretrained for a few steps on
two skills (``first``: repeat the first of three digits; ``last``: the last one), with
the data as JSONL files — enough for sampled answers to be digits some of the time.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shoal.adapt.config import AdaptConfig, TrainConfig, load_adapt_config
from shoal.adapt.svf import SVFModel, wrap_svf
from shoal.adapt.train import answer_logprobs, pad_right, train_expert, validation_score
from shoal.errors import RecipeError
from shoal.tasks.generation import GenerationTask

SKILLS = ("first", "last")
SPLITS = {"train": (0, 80), "validation": (80, 100), "test": (100, 120)}


@dataclass
class ToyWorld:
    root: Path
    base: Path
    tokenizer: Any
    examples: dict[str, list[dict[str, str]]]

    def model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.base).eval()

    def config(self, **train: Any) -> dict[str, Any]:
        """An adapt config over the JSONL files (paths relative to ``root``)."""
        tasks = {
            s: {
                split: {"type": "jsonl", "path": f"data/{s}/{split}.jsonl", "max_new_tokens": 3}
                for split in SPLITS
            }
            for s in SKILLS
        }
        return {"base": "base", "tasks": tasks, "train": train}


def _examples(skill: str) -> list[dict[str, str]]:
    rng = random.Random(skill)
    out = []
    for _ in range(120):
        d = [rng.randrange(10) for _ in range(3)]
        answer = d[0] if skill == "first" else d[-1]
        out.append({"prompt": f"Q: {skill} {d[0]} {d[1]} {d[2]}\nA:", "answer": str(answer)})
    return out


def make_toy_world(root: Path) -> ToyWorld:
    """Write the toy world under ``root`` (seeded; about two seconds)."""
    from shoal.testbed.sizes import TestbedSize
    from shoal.testbed.tokenizer import train_tokenizer
    from shoal.testbed.train import encode_examples, make_model, train_steps

    examples = {s: _examples(s) for s in SKILLS}
    corpus = [e["prompt"] + " " + e["answer"] for s in SKILLS for e in examples[s]]
    tok = train_tokenizer(corpus, 300)
    size = TestbedSize(
        name="toy",
        vocab_size=300,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        base_steps=40,
        expert_steps=0,
        batch_size=32,
        lr=1e-2,
        warmup_frac=0.1,
        weight_decay=0.0,
        train_per_skill=80,
        validation_per_skill=20,
        test_per_skill=20,
    )
    g = torch.Generator().manual_seed(0)
    model = make_model(size, tok, g)
    data = encode_examples(tok, [e for s in SKILLS for e in examples[s][:80]])
    train_steps(model, data, steps=40, size=size, pad_id=tok.pad_token_id, generator=g)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for s in SKILLS:
        for split, (a, b) in SPLITS.items():
            path = root / "data" / s / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(e) + "\n" for e in examples[s][a:b]))
    return ToyWorld(root, root / "base", tok, examples)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> ToyWorld:
    torch.set_num_threads(1)
    return make_toy_world(tmp_path_factory.mktemp("toy"))


def _task(world: ToyWorld, skill: str, split: str, scorer: Any = None) -> GenerationTask:
    a, b = SPLITS[split]
    return GenerationTask(
        f"{skill}/{split}",
        world.examples[skill][a:b],
        scorer or (lambda ans, e: float(ans == e["answer"])),
        max_new_tokens=3,
        tokenizer=world.tokenizer,
    )


# -- config -----------------------------------------------------------------------------------
def test_config_defaults_are_the_papers_and_paths_resolve(world: ToyWorld, tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "adapt.yaml"
    path.write_text(yaml.safe_dump(world.config() | {"root": str(world.root)}))
    cfg = load_adapt_config(path)
    assert isinstance(cfg, AdaptConfig)
    assert cfg.base == str(world.base) and cfg.skills == list(SKILLS)
    t = cfg.train
    assert (t.objective, t.lr, t.kl, t.clip, t.batch_size) == ("reinforce", 2e-3, 0.1, 1.0, 256)
    f = cfg.fewshot
    assert (f.examples, f.population, f.elite_ratio, f.init_std) == (10, 32, 0.2, 0.5)
    assert (cfg.matrices.mlp, cfg.matrices.attention) == (True, False)
    # without a root key, relative paths resolve against the file's folder
    path.write_text(yaml.safe_dump(world.config()))
    assert load_adapt_config(path).base == str((tmp_path / "base").resolve())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["train"].update(lrr=1), r"adapt\.yaml: train\.lrr: unknown key"),
        (lambda c: c["train"].update(objective="ppo"), r"adapt\.yaml: train\.objective: "),
        (lambda c: c.update(fewshot={"per": "layer"}), r"adapt\.yaml: fewshot\.per: "),
        (lambda c: c["tasks"].update(other=c["tasks"]["first"]), r"tasks: .*'other' is reserved"),
        (lambda c: c["tasks"]["first"].pop("test"), r"adapt\.yaml: tasks\.first\.test: "),
        (
            lambda c: c["tasks"]["last"]["train"].update(pth="x"),
            r"adapt\.yaml: tasks\.last\.train\.pth: unknown key for task type jsonl",
        ),
        (lambda c: c.pop("base"), r"adapt\.yaml: base: Field required"),
    ],
)
def test_config_errors_name_the_file_and_key(
    world: ToyWorld, tmp_path: Path, edit: Any, message: str
) -> None:
    import yaml

    data = world.config()
    edit(data)
    path = tmp_path / "adapt.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=message) as info:
        load_adapt_config(path)
    assert "\n" not in str(info.value)


# -- padding and log-likelihoods ----------------------------------------------------------------
def test_right_padding_changes_no_log_probability(world: ToyWorld) -> None:
    """Batched answer log-probs equal one-row-at-a-time ones, and HF's own loss."""
    model = world.model()
    ex = world.examples["first"][:5]
    ex[0] = {"prompt": ex[0]["prompt"] + " and more words", "answer": "12"}  # unequal lengths
    prompts, answers = [e["prompt"] for e in ex], [e["answer"] for e in ex]
    batched, counts = answer_logprobs(model, world.tokenizer, prompts, answers, batch_size=5)
    single = torch.cat(
        [
            answer_logprobs(model, world.tokenizer, [p], [a])[0]
            for p, a in zip(prompts, answers, strict=True)
        ]
    )
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    # the second implementation: transformers' mean cross-entropy over labelled tokens
    tok = world.tokenizer
    p_ids = [tok(p)["input_ids"] for p in prompts]
    a_ids = [
        tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in answers
    ]
    ids, mask, attn = pad_right(p_ids, a_ids, tok.pad_token_id)
    labels = torch.where(mask, ids, torch.full_like(ids, -100))
    with torch.no_grad():
        hf = model(input_ids=ids, attention_mask=attn, labels=labels).loss
    assert float(-batched.sum() / counts.sum()) == pytest.approx(float(hf), rel=1e-5)
    assert counts.tolist() == [len(a) for a in a_ids]


# -- training --------------------------------------------------------------------------------
def _wrapped(world: ToyWorld) -> SVFModel:
    return wrap_svf(world.model())


def test_reinforce_keeps_the_best_validation_z(world: ToyWorld) -> None:
    """REINFORCE on a reward of about one half (the answer is an even digit): the kept z
    is the one of the best validation score in the history, never below the base, and
    re-scoring the model with it gives that score."""
    svf = _wrapped(world)
    even = lambda a, e: float(a in ("0", "2", "4", "6", "8"))  # noqa: E731
    train = _task(world, "first", "train", even)
    val = _task(world, "first", "validation", even)
    opts = TrainConfig(steps=20, batch_size=32, lr=5e-2, eval_every=5, patience=10, seed=0)
    res = train_expert(svf, world.tokenizer, train, val, opts, progress=False)
    vals = {r["step"]: r["val"] for r in res.history if r["val"] is not None}
    assert sorted(vals) == [0, 5, 10, 15, 20]
    assert vals[0] == res.base_score
    assert res.best_score == max(vals.values()) >= res.base_score
    assert vals[res.best_step] == res.best_score
    assert res.best_step == min(s for s, v in vals.items() if v == res.best_score)
    assert all(r["reward"] is None or -1 <= r["reward"] <= 1 for r in res.history)
    # seeded, so this run is fixed: greedy answers turn even at step 5 and drift back
    # later, so the kept z is not the last one
    assert res.best_score > res.base_score and res.best_step < 20
    for name, v in svf.get_z().items():  # the model is left at the kept z
        assert torch.equal(v, res.z[name])
    assert validation_score(svf, val, world.tokenizer) == res.best_score


def _hf_nll(model: Any, tok: Any, examples: list[dict[str, str]]) -> float:
    """Mean gold-answer cross-entropy by transformers' own loss (labels = answer tokens)."""
    p_ids = [tok(e["prompt"])["input_ids"] for e in examples]
    eos = [tok.eos_token_id]
    a_ids = [tok(" " + e["answer"], add_special_tokens=False)["input_ids"] + eos for e in examples]
    ids, mask, attn = pad_right(p_ids, a_ids, tok.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, labels=torch.where(mask, ids, -100))
    return float(out.loss)


@dataclass
class _LikelihoodTask:
    """A validation 'task' scoring exp(−NLL) of the gold answers: one number in [0, 1]."""

    examples: list[dict[str, str]]
    tokenizer: Any
    name: str = "likelihood"

    def __len__(self) -> int:
        return 1

    def score(self, model: Any) -> np.ndarray:
        return np.array([np.exp(-_hf_nll(model, self.tokenizer, self.examples))])


def test_supervised_lowers_gold_answer_nll(world: ToyWorld) -> None:
    svf = _wrapped(world)
    train = _task(world, "last", "train")
    held = world.examples["last"][80:100]
    val = _LikelihoodTask(held, world.tokenizer)
    before = _hf_nll(svf, world.tokenizer, train.examples)
    opts = TrainConfig(
        objective="supervised", steps=20, batch_size=32, lr=0.1, eval_every=5, patience=5
    )
    res = train_expert(svf, world.tokenizer, train, val, opts, progress=False)
    assert res.history[-1]["reward"] is None and res.history[-1]["kl"] is None
    assert res.best_step > 0  # the likelihood of held-out answers rose
    after = _hf_nll(svf, world.tokenizer, train.examples)  # the kept z
    assert after < before - 1e-3  # small: 192 numbers of z in a 2-block toy
    assert _hf_nll(svf, world.tokenizer, held) == pytest.approx(-np.log(res.best_score), rel=1e-6)


def test_early_stopping_after_patience_and_determinism(world: ToyWorld) -> None:
    """A validation score that never moves stops training after `patience` scores."""
    never = lambda a, e: 0.0  # noqa: E731
    val = _task(world, "first", "validation", never)
    train = _task(world, "first", "train")
    opts = TrainConfig(steps=50, batch_size=4, eval_every=2, patience=3, seed=5, kl=0.2)
    runs = []
    for _ in range(2):
        svf = _wrapped(world)
        runs.append((svf, train_expert(svf, world.tokenizer, train, val, opts, progress=False)))
    res = runs[0][1]
    assert res.stopped == "patience" and res.steps == 6  # scored at 2, 4, 6: no gain
    assert [r["step"] for r in res.history] == list(range(7))
    assert res.best_step == 0 and all(torch.equal(v, torch.ones_like(v)) for v in res.z.values())
    # z went back to the base, but the steps really moved it: the histories agree exactly
    assert [r["loss"] for r in res.history] == [r["loss"] for r in runs[1][1].history]
    assert any(r["kl"] for r in res.history[2:])


def test_the_loop_trains_the_lora_baseline_supervised_only(world: ToyWorld) -> None:
    """The same loop, options and early stopping train a peft LoRA: the gold answers'
    NLL falls and the kept matrices give the kept validation score; REINFORCE refuses."""
    from shoal.adapt.lora import wrap_lora

    lora = wrap_lora(world.model(), rank=4, seed=0)
    train = _task(world, "last", "train")
    held = world.examples["last"][80:100]
    val = _LikelihoodTask(held, world.tokenizer)
    before = _hf_nll(lora, world.tokenizer, train.examples)
    opts = TrainConfig(
        objective="supervised", steps=20, batch_size=32, lr=1e-2, eval_every=5, patience=5
    )
    res = train_expert(lora, world.tokenizer, train, val, opts, progress=False)
    assert res.best_step > 0
    assert _hf_nll(lora, world.tokenizer, train.examples) < before - 1e-3
    assert _hf_nll(lora, world.tokenizer, held) == pytest.approx(-np.log(res.best_score), rel=1e-6)
    from shoal.adapt.svf import AdaptError

    with pytest.raises(AdaptError, match="reinforce trains SVF z vectors only"):
        train_expert(lora, world.tokenizer, train, val, TrainConfig(steps=1), progress=False)
