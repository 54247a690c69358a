"""A byte-level BPE tokenizer trained offline on the testbed's own text.

Trained with the ``tokenizers`` library and wrapped as a
``transformers.PreTrainedTokenizerFast``, so it saves beside the model and
``AutoTokenizer.from_pretrained`` loads it back. Encoding a text prepends
``<bos>``; the end of an answer is ``<eos>``; batches pad with ``<pad>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["BOS", "EOS", "PAD", "train_tokenizer"]

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, split_digits: bool = True) -> Any:
    """Train a byte-level BPE tokenizer on ``texts``.

    Args:
        texts: The training corpus, one string per item (order matters only for
            tie-breaking, which the trainer does deterministically).
        vocab_size: Final vocabulary, including the 256 byte symbols and the
            three special tokens (ids 0, 1, 2 = pad, bos, eos).
        split_digits: Give every digit its own token (as Llama's tokenizer
            does), so arithmetic is learned digit by digit rather than as a
            table of merged numbers.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos set and
        left padding (the side generation needs).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=512,
    )
