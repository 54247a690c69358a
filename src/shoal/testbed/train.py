"""Training the testbed's tiny Llamas: seeded init, answer-only loss, AdamW.

A sequence is ``<bos> Q: <question>\\nA: <answer><eos>``. The prompt and the
answer are tokenized apart and joined, so the prompt's tokens are exactly the
ones a model sees at generation time; the loss covers the answer tokens and
``<eos>`` only. The learning rate warms up linearly and then decays linearly to
zero. All randomness (initial weights, batch order) comes from one
``torch.Generator``; nothing reads the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shoal.testbed.sizes import TestbedSize

__all__ = ["Encoded", "encode_examples", "make_model", "train_steps"]

IGNORE = -100  # label value Hugging Face losses skip


@dataclass(frozen=True)
class Encoded:
    """One training sequence: token ids and how many of them are prompt."""

    ids: tuple[int, ...]
    prompt_len: int


def encode_examples(tokenizer: Any, examples: Sequence[dict[str, Any]]) -> list[Encoded]:
    """Tokenize examples for training: prompt (with ``<bos>``) + ``" answer"`` + ``<eos>``."""
    prompts = tokenizer([e["prompt"] for e in examples])["input_ids"]
    answers = tokenizer([" " + e["answer"] for e in examples], add_special_tokens=False)[
        "input_ids"
    ]
    eos = tokenizer.eos_token_id
    return [
        Encoded(tuple(p) + tuple(a) + (eos,), len(p)) for p, a in zip(prompts, answers, strict=True)
    ]


def make_model(size: TestbedSize, tokenizer: Any, generator: torch.Generator) -> Any:
    """A fresh ``LlamaForCausalLM`` of ``size`` with weights drawn from ``generator``.

    Matrices (embeddings, projections) are drawn from N(0, 0.02²) in the order
    of their names; norm weights are ones. Embeddings and output head are tied.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for _name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.02)
            else:
                param.fill_(1.0)
    return model


def _batch(rows: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs with labels only on answer tokens."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        seq = torch.tensor(r.ids, dtype=torch.long)
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
        labels[i, r.prompt_len : len(seq)] = seq[r.prompt_len :]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train_steps(
    model: Any,
    data: Sequence[Encoded],
    *,
    steps: int,
    size: TestbedSize,
    pad_id: int,
    generator: torch.Generator,
    on_step: Callable[[int, float], None] | None = None,
    device: str | torch.device | None = None,
    lr: float | None = None,
) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps on ``data``.

    Batches walk through seeded permutations of ``data`` (a new one each epoch).

    Args:
        model: A causal LM in float32.
        data: Encoded training sequences.
        steps: Optimiser steps.
        size: Supplies batch size, learning rate, warm-up and weight decay.
        pad_id: Padding token id.
        generator: Source of the batch order.
        on_step: Called as ``on_step(step, loss)`` after each step.
        device: Where the batches go (the model must already be there);
            ``None`` means CPU. The batch order is drawn on the CPU either way.
        lr: Peak learning rate (default: ``size.lr``).

    Returns:
        The loss of every step.
    """
    if not data:
        raise ValueError("no training data")
    params = [p for p in model.parameters() if p.requires_grad]
    # decay matrices only; norm gains stay free (the usual GPT/Llama recipe)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": size.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    peak = size.lr if lr is None else lr
    opt = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.95))
    warmup = max(1, int(size.warmup_frac * steps))
    losses: list[float] = []
    order = torch.randperm(len(data), generator=generator).tolist()
    cursor = 0
    model.train()
    for step in range(steps):
        if cursor + size.batch_size > len(order):
            order = torch.randperm(len(data), generator=generator).tolist()
            cursor = 0
        rows = [data[i] for i in order[cursor : cursor + size.batch_size]]
        cursor += size.batch_size
        for group in opt.param_groups:
            group["lr"] = peak * _lr_factor(step, steps, warmup)
        batch = {k: v.to(device or "cpu") for k, v in _batch(rows, pad_id).items()}
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
