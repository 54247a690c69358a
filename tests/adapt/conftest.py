"""Tiny seeded models for the adapt tests (built from configs, no download)."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-block Llama (hidden 32, MLP 64, vocabulary 64) with seeded random weights."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """A 2-block GPT-2 (its MLP and attention use the transposed ``Conv1D``)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture
def llama() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture
def gpt2() -> torch.nn.Module:
    return tiny_gpt2()


@pytest.fixture
def input_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (3, 10), generator=g)


@pytest.fixture
def make_llama() -> object:
    """``make_llama(seed)`` → a fresh tiny Llama."""
    return tiny_llama
