"""Tiny Llama models whose tokenizers have different vocabularies (no hub access).

Imported by name by the vocabulary tests and their mergekit cross-check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from merge_helpers import llama_config


def word_tokenizer(words: list[str]) -> Any:
    """A word-level fast tokenizer whose token ids are the positions in ``words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def vocab_model(path: Path, tokenizer: Any, seed: int, layers: int = 2) -> Path:
    """A tiny Llama with one embedding / head row per token of ``tokenizer``, saved with it."""
    from transformers import AutoModelForCausalLM

    config = llama_config(layers=layers, vocab_size=len(tokenizer))
    model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.05
            param.copy_(1.0 + noise if "norm" in name else noise)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
