"""Tiny Hugging Face models built from configs with fixed seeds (no hub access)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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


def llama_config(layers: int = 2) -> object:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


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


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llama family: base, a, b (2 layers, hidden 32)."""
    return build_family(tmp_path_factory.mktemp("llama"), llama_config())


@pytest.fixture(scope="session")
def llama_sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same family saved in shards of 20 kB."""
    return build_family(tmp_path_factory.mktemp("llama_sh"), llama_config(), max_shard_size="20KB")


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny GPT-2 family: base, a, b."""
    return build_family(tmp_path_factory.mktemp("gpt2"), gpt2_config())


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, read with safetensors directly."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture
def write_recipe(tmp_path: Path) -> Callable[[str], Path]:
    """Write YAML text to a recipe file in the test's directory."""

    def _write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return _write
