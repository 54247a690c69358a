"""The LoRA baseline of Transformer²: low-rank updates of the attention matrices (peft).

Transformer² judges SVF against LoRA (Hu et al., 2022) trained on the same data: each
chosen matrix becomes W + (α/r)·B A with A ∈ R^{r×n}, B ∈ R^{m×r}, B = 0 at the start,
so the first forward is the base model's. :func:`wrap_lora` builds it with ``peft``
(rank 16 on the attention projections by default, as in the paper's comparison) and
returns a :class:`LoRAModel`, which offers what the training loop of
:mod:`shoal.adapt.train` uses of an :class:`~shoal.adapt.svf.SVFModel`: the trainable
tensors, a snapshot of them (``get_z`` / ``set_z``: the A and B matrices, by peft's
names) and the model to score. So :func:`~shoal.adapt.train.train_expert` trains both
with one loop, the supervised objective, optimiser, schedule, early stopping and all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from shoal.adapt.svf import AdaptError

#: the attention projections of Llama-family models (the paper's LoRA targets)
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoRAModel:
    """A causal LM with peft LoRA adapters, trainable through the SVF training loop.

    Attributes:
        model: The ``peft`` model (generates and scores like the base model).
        rank: r.
        targets: The module-name suffixes adapted.
    """

    def __init__(self, model: Any, rank: int, targets: Sequence[str]) -> None:
        self.model = model
        self.rank = rank
        self.targets = tuple(targets)
        self._named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def parameters(self) -> Iterator[nn.Parameter]:
        """The LoRA matrices A and B, for an optimiser."""
        return iter(p for _, p in self._named)

    def num_trainable(self) -> int:
        """How many numbers the adapters hold."""
        return sum(p.numel() for _, p in self._named)

    def get_z(self) -> dict[str, torch.Tensor]:
        """A detached copy of every LoRA matrix, by parameter name."""
        return {n: p.detach().clone() for n, p in self._named}

    def set_z(self, z: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
        """Copy ``z`` (from :meth:`get_z`) into the LoRA matrices."""
        if strict and set(z) != {n for n, _ in self._named}:
            raise AdaptError("LoRA state: the names differ from this model's adapters")
        with torch.no_grad():
            for n, p in self._named:
                if n in z:
                    p.copy_(z[n])

    @contextlib.contextmanager
    def cached(self) -> Iterator[None]:
        """Nothing to cache (peft adds B A x beside W x at every forward)."""
        yield

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def wrap_lora(
    model: nn.Module,
    *,
    rank: int = 16,
    alpha: int | None = None,
    targets: Sequence[str] = ATTENTION_PROJECTIONS,
    seed: int = 0,
) -> LoRAModel:
    """Add LoRA adapters to ``model`` (in place, through peft) and freeze everything else.

    Args:
        model: A causal LM.
        rank: r, the adapters' rank.
        alpha: The scale numerator α (default 2r, peft's common choice; scale α/r).
        targets: Module-name suffixes to adapt (default: the attention projections).
        seed: Seed of A's random initialisation (B starts at zero).

    Returns:
        The :class:`LoRAModel`.

    Raises:
        AdaptError: ``rank`` ≤ 0, or no module matches ``targets``.
    """
    from peft import LoraConfig, get_peft_model

    if rank <= 0:
        raise AdaptError(f"lora rank: {rank} must be positive")
    names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in targets]
    if not names:
        raise AdaptError(f"lora targets: no module of the model is named {list(targets)}")
    config = LoraConfig(
        r=rank,
        lora_alpha=int(alpha if alpha is not None else 2 * rank),
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    peft_model.eval()
    return LoRAModel(peft_model, rank, targets)
