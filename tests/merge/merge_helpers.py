"""Tiny Hugging Face models built from configs with fixed seeds, and checkpoint reading.

Imported by name (``from merge_helpers import ...``) from the merge tests and their
conftest; fixtures live in conftest.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _fill(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter seeded values (norm weights near 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.05
            param.copy_(1.0 + noise if "norm" in name or name.endswith("ln_1.weight") else noise)


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)


# sizes of every tiny Llama-family model of the merge tests (layers and extras vary)
TINY_LLAMA: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def llama_config(layers: int = 2, **overrides: Any) -> object:
    """A tiny ``LlamaConfig`` with an untied head; ``overrides`` set further fields."""
    from transformers import LlamaConfig

    fields = {**TINY_LLAMA, "num_hidden_layers": layers, "tie_word_embeddings": False}
    return LlamaConfig(**{**fields, **overrides})


def gpt2_config() -> object:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)


def build_family(
    root: Path, config: object, names: tuple[str, ...] = ("base", "a", "b"), **save: object
) -> dict[str, Path]:
    """A base model and perturbed copies, each saved as a HF directory."""
    from transformers import AutoModelForCausalLM

    paths: dict[str, Path] = {}
    for i, name in enumerate(names):
        model = AutoModelForCausalLM.from_config(config)
        _fill(model, seed=1234)
        if i > 0:
            _perturb(model, seed=i)
        paths[name] = root / name
        model.save_pretrained(paths[name], safe_serialization=True, **save)
    return paths


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, read with safetensors directly."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out
