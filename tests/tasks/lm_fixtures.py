"""A tiny causal LM and word-level tokenizer built offline from fixed seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

WORDS = ["red", "green", "blue", "cat", "dog", "one", "two", "three", "is", "the", "Q:", "A:"]


def make_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def make_model(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(WORDS) + 3,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)  # re-draw every weight from an explicit seed
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def save_lm(directory: Path, seed: int = 0) -> Path:
    """Write the tiny LM + tokenizer as a Hugging Face directory."""
    make_model(seed).save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


#: (prompt, choices, index of the correct one) for multiple-choice tests
PROMPTS_MC = [
    ("Q: the cat is", ["red", "green"], 0),
    ("Q: one two", ["three", "one", "two"], 0),
    ("Q: the dog is", ["blue", "red"], 1),
    ("the", ["cat", "dog"], 1),
    ("Q: red green", ["blue", "cat"], 0),
    ("A: two", ["three", "one"], 1),
]
