"""Training SVF z vectors by REINFORCE with a KL penalty (METHODS.md §5).

For sampled answers ŷ to prompts x with rewards r (+1 right, −1 wrong), one step
minimises

    L = −mean_b[ log π_W′(ŷ_b | x_b) · r_b ] + λ · KL(π_W′ ‖ π_W)       # METHODS.md §5

where log π(ŷ | x) is the answer's summed token log-probability under the adapted
model, and the KL term is KL(π_W′ ‖ π_W) = Σ_v π_W′(v) (log π_W′(v) − log π_W(v)) — from
the adapted policy to the base one, in the adapted model's expectation — at every answer
position, averaged over all answer tokens of the batch. The base distribution comes
from the same model with z = 1 (no second copy of the weights). λ ∈ {0, 0.1, 0.2, 0.3}
in the paper.

The optimiser is plain torch: AdamW (lr 2e-3 in the paper) with cosine decay and
gradient-norm clipping (:func:`make_optimizer`, :func:`reinforce_step`). Weight decay
defaults to 0: decay would pull z towards 0, i.e. towards erasing the matrix, whereas
z = 1 is the base model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # pragma: no cover
    from shoal.adapt.lora import LoRAModel
    from shoal.adapt.svf import SVFModel

__all__ = [
    "ReinforceStats",
    "make_optimizer",
    "reinforce_loss",
    "reinforce_step",
    "sample_answers",
]


@dataclass(frozen=True)
class ReinforceStats:
    """The numbers of one step (floats, detached).

    Attributes:
        loss: The total loss L.
        policy: −mean_b log π(ŷ_b | x_b) r_b.
        kl: KL(π_W′ ‖ π_W) per answer token (computed even when λ = 0, if base logits
            were given).
        reward: Mean reward.
        grad_norm: Norm of the z gradient before clipping (``nan`` for a loss alone).
    """

    loss: float
    policy: float
    kl: float
    reward: float
    grad_norm: float = float("nan")


def reinforce_loss(
    logits: torch.Tensor,
    base_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    rewards: torch.Tensor,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, ReinforceStats]:
    """The REINFORCE loss with KL(π_W′ ‖ π_W) penalty for one batch.

    Logits at position t predict the token at t + 1 (causal LM convention).

    Args:
        logits: ``(B, T, V)`` of the adapted model on ``input_ids`` (with gradient).
        base_logits: ``(B, T, V)`` of the base model (z = 1), or ``None`` when λ = 0.
        input_ids: ``(B, T)`` prompt followed by the sampled answer.
        answer_mask: ``(B, T)`` true at the answer's tokens (not the prompt, not padding).
        rewards: ``(B,)`` rewards.
        kl_coef: λ.

    Returns:
        ``(loss, stats)``.
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    target = input_ids[:, 1:]
    mask = answer_mask[:, 1:].to(logp.dtype)
    token_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    seq_logp = (token_logp * mask).sum(dim=1)  # log π(ŷ | x)
    r = rewards.to(logp.dtype)
    policy = -(seq_logp * r).mean()
    loss = policy
    kl = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if base_logits is not None:
        base_logp = F.log_softmax(base_logits[:, :-1].detach().float(), dim=-1)
        # KL(π_W′ ‖ π_W) = Σ_v π_W′(v) (log π_W′(v) − log π_W(v)), at each answer position
        per_token = (logp.exp() * (logp - base_logp)).sum(dim=-1)
        kl = (per_token * mask).sum() / mask.sum().clamp_min(1.0)
        loss = loss + kl_coef * kl
    elif kl_coef != 0.0:
        raise ValueError("kl_coef > 0 needs base_logits")
    stats = ReinforceStats(
        loss=float(loss.detach()),
        policy=float(policy.detach()),
        kl=float(kl.detach()),
        reward=float(r.mean()),
    )
    return loss, stats


def make_optimizer(
    wrapped: SVFModel | LoRAModel,
    total_steps: int,
    *,
    lr: float = 2e-3,
    weight_decay: float = 0.0,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the z vectors, with cosine decay of the learning rate to 0.

    Args:
        wrapped: The SVF model.
        total_steps: Steps until the learning rate reaches 0.
        lr: Peak learning rate (METHODS.md §5: 2e-3).
        weight_decay: AdamW's decoupled decay (0: see the module docstring).

    Returns:
        ``(optimizer, scheduler)``; call ``scheduler.step()`` after each step
        (:func:`reinforce_step` does).
    """
    opt = torch.optim.AdamW(list(wrapped.parameters()), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    return opt, sched


def reinforce_step(
    wrapped: SVFModel,
    optimizer: torch.optim.Optimizer,
    input_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    rewards: torch.Tensor,
    *,
    kl_coef: float = 0.0,
    attention_mask: torch.Tensor | None = None,
    max_grad_norm: float = 1.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> ReinforceStats:
    """One REINFORCE step on the z vectors (see :func:`reinforce_loss`).

    The base logits (z = 1) are computed first, without gradient, then the adapted
    forward with gradient; the z gradient is clipped to ``max_grad_norm`` before the
    optimiser step.

    Args:
        wrapped: The SVF model (its z vectors are what ``optimizer`` holds).
        optimizer: E.g. from :func:`make_optimizer`.
        input_ids: ``(B, T)`` prompts followed by sampled answers.
        answer_mask: ``(B, T)`` true at answer tokens.
        rewards: ``(B,)`` rewards (+1 / −1).
        kl_coef: λ; 0 skips the base forward.
        attention_mask: Passed to the model.
        max_grad_norm: Clipping threshold.
        scheduler: Stepped after the optimiser, if given.

    Returns:
        The step's :class:`ReinforceStats`.
    """
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    base_logits = None
    if kl_coef != 0.0:
        with torch.no_grad(), wrapped.using_z(None):
            base_logits = wrapped(input_ids=input_ids, **kwargs).logits
    logits = wrapped(input_ids=input_ids, **kwargs).logits
    loss, stats = reinforce_loss(logits, base_logits, input_ids, answer_mask, rewards, kl_coef)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(list(wrapped.parameters()), max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return ReinforceStats(stats.loss, stats.policy, stats.kl, stats.reward, float(norm))


@torch.no_grad()
def sample_answers(
    wrapped: SVFModel | Callable[..., object],
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    generator: torch.Generator,
    *,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample answers token by token from the (adapted) model.

    A plain loop without a KV cache, for short answers; prompts in a batch must have
    the same length (no padding).

    Args:
        wrapped: The model to sample from (called as ``wrapped(input_ids=...)``).
        prompt_ids: ``(B, P)`` prompts.
        max_new_tokens: Answer length.
        generator: Seeded ``torch.Generator`` (on the logits' device).
        temperature: Softmax temperature.

    Returns:
        ``(input_ids, answer_mask)``: ``(B, P + max_new_tokens)`` and the mask of the
        answer positions, ready for :func:`reinforce_step`.
    """
    ids = prompt_ids
    for _ in range(max_new_tokens):
        logits = wrapped(input_ids=ids).logits[:, -1].float()  # type: ignore[union-attr]
        probs = torch.softmax(logits / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, nxt.to(ids.dtype)], dim=1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, prompt_ids.shape[1] :] = True
    return ids, mask
