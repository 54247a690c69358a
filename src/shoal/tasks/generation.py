"""Scoring a causal language model by greedy generation, one score per example.

A :class:`GenerationTask` holds a list of examples (plain dicts), the key of the
prompt in each, and a scorer ``(answer, example) -> float in [0, 1]``. Scoring
a model generates greedily for every prompt, in batches with left padding and
the KV cache, stopping each row at the end-of-sequence token, and returns the
scores as an array of shape ``(n,)`` -- never only their mean (DESIGN.md,
``tasks``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shoal.errors import TaskError

__all__ = ["GenerationTask", "extract_answer", "generate_answers"]

Scorer = Callable[[str, dict[str, Any]], float]


def extract_answer(text: str) -> str:
    """The answer in a generated continuation: its first line, stripped.

    Args:
        text: The decoded continuation (prompt excluded, special tokens removed).

    Returns:
        The text before the first newline, without surrounding white space.
    """
    return text.split("\n", 1)[0].strip()


def _model_device(model: torch.nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


@torch.inference_mode()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    device: str | torch.device | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts``, decoded, in the order given.

    Prompts are sorted by length so that a batch pads little, padded on the left
    (the model then continues every row from its last column), generated with
    the KV cache, and stopped at the tokenizer's end-of-sequence token.

    Args:
        model: A Hugging Face causal LM (``generate`` is used).
        tokenizer: Its tokenizer; must define a pad or eos token.
        prompts: The prompt strings.
        max_new_tokens: Most tokens generated per prompt.
        batch_size: Prompts per ``generate`` call.
        device: Where the inputs go; ``None`` means the model's device.

    Returns:
        One decoded continuation per prompt (prompt not included, special tokens
        removed), untrimmed.
    """
    if max_new_tokens < 1:
        raise TaskError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise TaskError(f"batch_size must be >= 1, got {batch_size}")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if pad_id is None:
        raise TaskError("the tokenizer defines neither a pad token nor an eos token")
    dev = torch.device(device) if device is not None else _model_device(model)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):  # left padding
                seq = encoded[i]
                ids[r, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                mask[r, width - len(seq) :] = 1
            generated = model.generate(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                eos_token_id=eos_id,
                pad_token_id=pad_id,
                use_cache=True,
            )
            new = generated[:, width:].cpu()
            for r, i in enumerate(rows):
                out[i] = tokenizer.decode(new[r].tolist(), skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out


@dataclass
class GenerationTask:
    """A generation benchmark: prompts in, one score in [0, 1] per example out.

    Attributes:
        name: The task's name, used in logs and reports.
        examples: The examples, plain dicts; each holds ``prompt_key``.
        scorer: ``scorer(answer, example) -> float`` in [0, 1]; it gets the
            extracted answer (first line of the continuation, stripped).
        prompt_key: Key of the prompt string in each example.
        max_new_tokens: Most tokens generated per example.
        batch_size: Prompts per generation batch.
        tokenizer: Default tokenizer, used when :meth:`score` is given none.
        device: Where to run; ``None`` means the model's device.
    """

    name: str
    examples: list[dict[str, Any]]
    scorer: Scorer
    prompt_key: str = "prompt"
    max_new_tokens: int = 16
    batch_size: int = 64
    tokenizer: Any = None
    device: str | None = None

    def __post_init__(self) -> None:
        for i, example in enumerate(self.examples):
            if not isinstance(example.get(self.prompt_key), str):
                raise TaskError(
                    f"task {self.name!r}: example {i} has no string under key {self.prompt_key!r}"
                )

    def __len__(self) -> int:
        return len(self.examples)

    def prompts(self) -> list[str]:
        """The prompt of every example, in order."""
        return [e[self.prompt_key] for e in self.examples]

    def answers(self, model: Any, tokenizer: Any = None) -> list[str]:
        """The extracted answer of ``model`` to every example, in order."""
        tok = tokenizer if tokenizer is not None else self.tokenizer
        if tok is None:
            raise TaskError(f"task {self.name!r}: no tokenizer given and none attached")
        texts = generate_answers(
            model,
            tok,
            self.prompts(),
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            device=self.device,
        )
        return [extract_answer(t) for t in texts]

    def score_answers(self, answers: Sequence[str]) -> np.ndarray:
        """Scores of given answers, shape ``(n,)``, float64 in [0, 1]."""
        if len(answers) != len(self.examples):
            raise TaskError(
                f"task {self.name!r}: {len(answers)} answers for {len(self.examples)} examples"
            )
        scores = np.array(
            [float(self.scorer(a, e)) for a, e in zip(answers, self.examples, strict=True)],
            dtype=np.float64,
        )
        # a scorer outside [0, 1] or NaN is a bug in the scorer, not in the model
        if (
            not np.all(np.isfinite(scores))
            or scores.min(initial=0.0) < 0
            or scores.max(initial=0.0) > 1
        ):
            raise TaskError(f"task {self.name!r}: scorer returned values outside [0, 1]")
        return scores

    def score(self, model: Any, tokenizer: Any = None) -> np.ndarray:
        """Generate for every example and score it.

        Args:
            model: A Hugging Face causal LM.
            tokenizer: Its tokenizer; defaults to the task's own.

        Returns:
            Array of shape ``(n,)``, float64 in [0, 1], in example order.
        """
        return self.score_answers(self.answers(model, tokenizer))
