"""Multiple choice by log-likelihood: the model picks the choice it finds most likely.

For every example, each choice's continuation log-probability given the prompt,
log p(c | x) = Σ_t log p(c_t | x, c_<t), is computed in one batched forward pass (right
padding); the example scores 1 when the correct choice has the highest value (ties go to
the first choice), else 0. ``length_normalize`` divides by the number of choice tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shoal.errors import TaskError

__all__ = ["ChoiceTask", "choice_logprobs"]


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.inference_mode()
def choice_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    *,
    batch_size: int = 32,
) -> list[np.ndarray]:
    """Summed log-probabilities of every choice continuation, one array per example.

    Args:
        model: A causal LM returning ``.logits`` of shape (batch, seq, vocab).
        tokenizer: Its tokenizer. The choice is tokenized on its own (no special tokens)
            and appended to the prompt's tokens, so write choices with the leading space
            the prompt format expects.
        prompts: One prompt per example.
        choices: The choices of each example.
        batch_size: Sequences per forward pass.

    Returns:
        For example i an array of shape ``(len(choices[i]),)`` and a parallel array of the
        token counts, stacked as ``(2, k)`` float64: row 0 log-probs, row 1 lengths.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    seqs: list[tuple[int, int, list[int], int]] = []  # (example, choice, ids, prompt length)
    for i, (prompt, opts) in enumerate(zip(prompts, choices, strict=True)):
        p_ids = list(tokenizer(prompt)["input_ids"])
        for j, c in enumerate(opts):
            c_ids = list(tokenizer(c, add_special_tokens=False)["input_ids"])
            if not c_ids:
                raise TaskError(f"example {i}: choice {j} ({c!r}) tokenizes to nothing")
            seqs.append((i, j, p_ids + c_ids, len(p_ids)))
    out = [np.zeros((2, len(c))) for c in choices]
    dev = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][2]))
        for start in range(0, len(order), batch_size):
            rows = [seqs[k] for k in order[start : start + batch_size]]
            width = max(len(r[2]) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, (_, _, seq, _) in enumerate(rows):
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for r, (i, j, seq, plen) in enumerate(rows):
                target = torch.tensor(seq[plen:])
                # the token at position t is predicted by the logits at t - 1
                lp = logp[r, plen - 1 : len(seq) - 1].gather(1, target[:, None]).sum()
                out[i][0, j] = float(lp)
                out[i][1, j] = len(seq) - plen
    finally:
        model.train(was_training)
    return out


@dataclass
class ChoiceTask:
    """A multiple-choice task scored by log-likelihood (per-example 0/1).

    Attributes:
        name: Task name.
        prompts: One prompt per example.
        choices: The choices of each example.
        answers: Index of the correct choice of each example.
        tokenizer: The model's tokenizer.
        batch_size: Sequences per forward pass.
        length_normalize: Rank by mean log-prob per choice token instead of the sum.
    """

    name: str
    prompts: list[str]
    choices: list[list[str]]
    answers: list[int]
    tokenizer: Any = field(repr=False, default=None)
    batch_size: int = 32
    length_normalize: bool = False

    def __post_init__(self) -> None:
        if not (len(self.prompts) == len(self.choices) == len(self.answers)):
            raise TaskError(f"task {self.name!r}: prompts, choices and answers differ in length")
        for i, (opts, ans) in enumerate(zip(self.choices, self.answers, strict=True)):
            if not 0 <= ans < len(opts):
                raise TaskError(f"task {self.name!r}: example {i} answer {ans} not a choice index")

    def __len__(self) -> int:
        return len(self.prompts)

    def score(self, model: Any) -> np.ndarray:
        """1.0 where the correct choice is the most likely one, else 0.0; shape ``(n,)``."""
        if self.tokenizer is None:
            raise TaskError(f"task {self.name!r}: no tokenizer")
        lps = choice_logprobs(
            model, self.tokenizer, self.prompts, self.choices, batch_size=self.batch_size
        )
        out = np.zeros(len(self))
        for i, arr in enumerate(lps):
            values = arr[0] / arr[1] if self.length_normalize else arr[0]
            out[i] = float(int(np.argmax(values)) == self.answers[i])
        return out
