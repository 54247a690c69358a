"""REINFORCE: the loss against hand computations, the KL direction, and a toy task learnt."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from shoal.adapt.reinforce import make_optimizer, reinforce_loss, reinforce_step, sample_answers
from shoal.adapt.svf import wrap_svf


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


# one sequence: prompt token 0, answer tokens 2 then 1, vocabulary of 3
IDS = torch.tensor([[0, 2, 1]])
MASK = torch.tensor([[False, True, True]])
NEW = [[2.0, 0.0, 1.0], [0.5, 1.5, -1.0], [0.0, 0.0, 0.0]]  # rows: positions 0, 1, 2
BASE = [[0.0, 0.0, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def test_kl_term_is_new_to_base_and_matches_hand_value() -> None:
    logits, base = torch.tensor([NEW]), torch.tensor([BASE])
    _, stats = reinforce_loss(logits, base, IDS, MASK, torch.tensor([0.0]), kl_coef=1.0)
    # positions 0 and 1 predict the answer tokens; position 2 predicts nothing
    p = [_softmax(NEW[0]), _softmax(NEW[1])]
    q = [_softmax(BASE[0]), _softmax(BASE[1])]
    forward = (_kl(p[0], q[0]) + _kl(p[1], q[1])) / 2
    backward = (_kl(q[0], p[0]) + _kl(q[1], p[1])) / 2
    assert abs(forward - backward) > 0.01  # the example tells the two directions apart
    assert stats.kl == pytest.approx(forward, rel=1e-6)
    assert stats.kl > 0
    assert stats.loss == pytest.approx(forward, rel=1e-6)  # zero reward: the KL alone
    _, same = reinforce_loss(logits, logits.clone(), IDS, MASK, torch.tensor([1.0]), kl_coef=1.0)
    assert same.kl == pytest.approx(0.0, abs=1e-7)


def test_policy_term_matches_hand_value() -> None:
    logits, base = torch.tensor([NEW, NEW]), torch.tensor([BASE, BASE])
    ids = torch.tensor([[0, 2, 1], [0, 0, 0]])
    mask = torch.tensor([[False, True, True], [False, True, False]])
    rewards = torch.tensor([1.0, -1.0])
    loss, stats = reinforce_loss(logits, base, ids, mask, rewards, kl_coef=0.2)
    lp0 = math.log(_softmax(NEW[0])[2]) + math.log(_softmax(NEW[1])[1])
    lp1 = math.log(_softmax(NEW[0])[0])
    policy = -(lp0 * 1.0 + lp1 * -1.0) / 2
    kls = [_kl(_softmax(NEW[i]), _softmax(BASE[i])) for i in (0, 1)]
    kl = (kls[0] + kls[1] + kls[0]) / 3  # three answer tokens in the batch
    assert stats.policy == pytest.approx(policy, rel=1e-6)
    assert stats.kl == pytest.approx(kl, rel=1e-6)
    assert float(loss) == pytest.approx(policy + 0.2 * kl, rel=1e-6)
    assert stats.reward == 0.0


def test_kl_gradient_vanishes_at_base(make_llama: Callable[[int], torch.nn.Module]) -> None:
    """At z = 1 the adapted and base policies agree: KL = 0 and so is its gradient."""
    svf = wrap_svf(make_llama(0))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 3:] = True
    with torch.no_grad():
        base = svf(input_ids=ids).logits
    loss, stats = reinforce_loss(svf(input_ids=ids).logits, base, ids, mask, torch.zeros(2), 1.0)
    loss.backward()
    assert stats.kl == pytest.approx(0.0, abs=1e-7)
    assert max(float(v.grad.abs().max()) for v in svf.parameters()) < 1e-6  # type: ignore[union-attr]


def _expected_reward(svf: object, prompts: torch.Tensor) -> float:
    """E[r] = P(even token) − P(odd token) for the next token, averaged over prompts."""
    with torch.no_grad():
        p = torch.softmax(svf(input_ids=prompts).logits[:, -1], dim=-1)  # type: ignore[operator]
    return float((p[:, 0::2].sum(-1) - p[:, 1::2].sum(-1)).mean())


def _toy_run(kl_coef: float, steps: int = 30) -> tuple[float, float, list[float], float]:
    """Reward +1 for an even next token, −1 for odd; REINFORCE on z alone.

    Returns (expected reward before, after, KL per step, final KL(π_W′ ‖ π_W) of the next
    token on held-out prompts). The model's init range is 0.2:
    at the default 0.02 its outputs are near uniform and hardly depend on the blocks.
    """
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    svf = wrap_svf(transformers.LlamaForCausalLM(config).eval(), attention=True)
    g = torch.Generator().manual_seed(0)
    held_out = torch.randint(0, 64, (32, 4), generator=g)
    before = _expected_reward(svf, held_out)
    opt, sched = make_optimizer(svf, steps, lr=0.1)
    kls = []
    for _ in range(steps):
        prompts = torch.randint(0, 64, (32, 4), generator=g)
        ids, mask = sample_answers(svf, prompts, 1, g)
        rewards = torch.where(ids[:, -1] % 2 == 0, 1.0, -1.0)
        stats = reinforce_step(svf, opt, ids, mask, rewards, kl_coef=kl_coef, scheduler=sched)
        kls.append(stats.kl)
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # cosine decayed to 0
    for _, p in svf.model.named_parameters():
        assert p.grad is None  # only z was trained
    with torch.no_grad():
        with svf.using_z(None):
            base = svf(input_ids=held_out).logits[:, -1]
        new = svf(input_ids=held_out).logits[:, -1]
    final_kl = float(
        (new.softmax(-1) * (new.log_softmax(-1) - base.log_softmax(-1))).sum(-1).mean()
    )
    return before, _expected_reward(svf, held_out), kls, final_kl


def test_few_steps_raise_reward_on_toy_task() -> None:
    before, after, kls, _ = _toy_run(kl_coef=0.1)
    assert after > before + 0.1, (before, after)
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 0.1  # moved off the base


def test_kl_penalty_keeps_policy_near_base() -> None:
    free = _toy_run(kl_coef=0.0, steps=15)
    held = _toy_run(kl_coef=5.0, steps=15)
    assert free[2][-1] == 0.0  # λ = 0: no base forward, nothing measured during training
    assert 0 < held[3] < 0.5 * free[3], (held[3], free[3])
    assert held[1] - held[0] < free[1] - free[0]  # and it gains less reward
