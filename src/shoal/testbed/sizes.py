"""Size presets of the testbed: model shape, training steps, split sizes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from shoal.errors import TaskError

__all__ = ["SIZES", "TestbedSize", "get_size"]


@dataclass(frozen=True)
class TestbedSize:
    """Everything a build of one size needs besides the seed.

    Attributes:
        name: Preset name.
        vocab_size: Byte-level BPE vocabulary, special tokens included.
        hidden_size: Llama hidden width.
        num_layers: Decoder layers.
        num_heads: Attention heads (as many key/value heads).
        intermediate_size: Width of the SwiGLU feed-forward layer.
        base_steps: Optimiser steps of the base model on the mix of all skills.
        expert_steps: Optimiser steps of each expert on its own skill.
        batch_size: Sequences per step.
        lr: Peak AdamW learning rate (linear warm-up, then linear decay to 0).
        expert_lr: The experts' peak learning rate (default: ``lr``).
        terse_base: Train the base on the skills in their terse form
            (:func:`~shoal.testbed.skills.terse_example`) rather than the full prompts.
        warmup_frac: Fraction of steps spent warming up.
        weight_decay: AdamW weight decay.
        train_per_skill: Training examples drawn per skill.
        validation_per_skill: Validation examples per skill.
        test_per_skill: Test examples per skill.
        split_digits: One token per digit in the tokenizer.
    """

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    base_steps: int
    expert_steps: int
    batch_size: int
    lr: float
    warmup_frac: float
    weight_decay: float
    train_per_skill: int
    validation_per_skill: int
    test_per_skill: int
    split_digits: bool = True
    expert_lr: float | None = None
    terse_base: bool = False

    def split_sizes(self) -> dict[str, int]:
        """Examples per split, per skill."""
        return {
            "train": self.train_per_skill,
            "validation": self.validation_per_skill,
            "test": self.test_per_skill,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for ``testbed.json``."""
        return asdict(self)


SIZES: dict[str, TestbedSize] = {
    # a pipeline smoke test: seconds on two cores, margins too thin to assert;
    # a short base and longer experts, so "expert >= base on its skill" holds
    "tiny": TestbedSize(
        name="tiny",
        vocab_size=768,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        intermediate_size=352,
        base_steps=60,
        expert_steps=120,
        batch_size=32,
        lr=3e-3,
        warmup_frac=0.1,
        weight_decay=0.01,
        train_per_skill=600,
        validation_per_skill=32,
        test_per_skill=32,
    ),
    # the probe's model (1.5M parameters) with digit tokens and 30,000 examples a skill
    # (docs/testbed.md, "How small was chosen"). The base learns all three skills in
    # their terse form for 3,000 steps; each expert then learns its skill's full prompt
    # in 300 gentle steps: small task vectors that merge (#4), margins of 26-54 points
    "small": TestbedSize(
        name="small",
        vocab_size=768,
        hidden_size=192,
        num_layers=3,
        num_heads=4,
        intermediate_size=544,
        base_steps=3000,
        expert_steps=300,
        batch_size=64,
        lr=3e-3,
        warmup_frac=0.1,
        weight_decay=0.01,
        train_per_skill=30000,
        validation_per_skill=150,
        test_per_skill=150,
        expert_lr=5e-4,
        terse_base=True,
    ),
}


def get_size(name: str) -> TestbedSize:
    """The preset called ``name``; unknown names raise :class:`TaskError`."""
    try:
        return SIZES[name]
    except KeyError:
        raise TaskError(f"unknown testbed size {name!r}; known: {', '.join(SIZES)}") from None
