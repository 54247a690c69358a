"""shoal merge against mergekit-yaml 0.1.x on models whose vocabularies differ.

Word-level tokenizers with shared, reordered and missing tokens, and two byte-level BPE
tokenizers (the testbed's) trained on different texts. Both tools merge the same files;
tensors are compared name by name (float32 to 1e-6) and the output vocabularies token by
token. Skipped without the side venv of ``make mergekit-venv``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from merge_helpers import state_dict
from mergekit_side import HAVE_MERGEKIT, SKIP_REASON, assert_same_tensors, run_mergekit
from vocab_helpers import vocab_model, word_tokenizer

from shoal.merge import merge_to_disk

pytestmark = pytest.mark.skipif(not HAVE_MERGEKIT, reason=SKIP_REASON)

WORDS = {
    "base": ["<unk>", "<s>", "</s>", "a", "b", "c", "d", "e"],
    "x": ["<unk>", "<s>", "</s>", "c", "a", "f", "b", "g", "h"],
    "y": ["<unk>", "</s>", "<s>", "e", "a", "b", "c", "q", "f", "r"],
    "z": ["<unk>", "<s>", "</s>", "g", "b", "c", "f", "a"],
}


@pytest.fixture(scope="module")
def words(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mkvocab")
    return {
        name: vocab_model(root / name, word_tokenizer(w), seed=20 + i)
        for i, (name, w) in enumerate(WORDS.items())
    }


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base and expert trained on English words, a third model on digits and symbols:
    byte-level BPE vocabularies of 300 that share the bytes and differ in their merges."""
    from shoal.testbed.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("mkbpe")
    prose = [f"the cat sat on the mat number {i} while the dog ran" for i in range(200)]
    sums = [f"{i} + {i * 7} = {i * 8}; x*y-z/{i}" for i in range(200)]
    one, two = train_tokenizer(prose, 300), train_tokenizer(sums, 300)
    assert one.get_vocab() != two.get_vocab()
    return {
        "base": vocab_model(root / "base", one, seed=30),
        "a": vocab_model(root / "a", one, seed=31),
        "b": vocab_model(root / "b", two, seed=32),
    }


def _both(text: str, tmp_path: Path) -> tuple[Path, Path]:
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(text)
    ours = merge_to_disk(recipe, tmp_path / "shoal", progress=False)
    theirs = run_mergekit(recipe, tmp_path / "mergekit")
    return ours, theirs


def _same(ours: Path, theirs: Path) -> None:
    import json

    from transformers import AutoTokenizer

    assert_same_tensors(state_dict(ours), state_dict(theirs))
    assert (
        AutoTokenizer.from_pretrained(ours).get_vocab()
        == AutoTokenizer.from_pretrained(theirs).get_vocab()
    )
    sizes = [json.loads((p / "config.json").read_text())["vocab_size"] for p in (ours, theirs)]
    assert sizes[0] == sizes[1]


def test_ties_into_the_base_vocabulary(words: dict[str, Path], tmp_path: Path) -> None:
    """Tokens the base alone has, tokens base and one model have, reordered ids."""
    ours, theirs = _both(
        f"""
merge_method: ties
base_model: {words["base"]}
models:
  - model: {words["x"]}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {words["y"]}
    parameters: {{weight: 0.4, density: 0.7}}
tokenizer_source: base
dtype: float32
""",
        tmp_path,
    )
    _same(ours, theirs)


def test_linear_into_a_model_vocabulary_with_tokens_and_padding(
    words: dict[str, Path], tmp_path: Path
) -> None:
    """No base: the only model with a token gives its row, the mean of those that have
    it otherwise; a new token, a forced zero row, a forced row of another model's token;
    padding rows."""
    ours, theirs = _both(
        f"""
merge_method: linear
models:
  - model: {words["x"]}
    parameters: {{weight: 2.0}}
  - model: {words["y"]}
    parameters: {{weight: 1.0}}
  - model: {words["z"]}
    parameters: {{weight: 0.5}}
tokenizer:
  source: {words["x"]}
  pad_to_multiple_of: 16
  tokens:
    q:
      source: {words["y"]}
    a:
      source: {{kind: zero}}
      force: true
    b:
      source: {{kind: model_token, model: {words["y"]}, token: r}}
      force: true
dtype: float32
""",
        tmp_path,
    )
    _same(ours, theirs)


def test_task_arithmetic_over_bpe_vocabularies(bpe: dict[str, Path], tmp_path: Path) -> None:
    """Two byte-level BPE vocabularies trained on different texts, into the base's."""
    ours, theirs = _both(
        f"""
merge_method: task_arithmetic
base_model: {bpe["base"]}
models:
  - model: {bpe["a"]}
    parameters: {{weight: 0.7}}
  - model: {bpe["b"]}
    parameters: {{weight: 0.5}}
tokenizer_source: base
dtype: float32
""",
        tmp_path,
    )
    _same(ours, theirs)


def test_slerp_into_the_other_bpe_vocabulary(bpe: dict[str, Path], tmp_path: Path) -> None:
    """SLERP with the vocabulary of the t = 1 model, padded to a multiple of 64."""
    ours, theirs = _both(
        f"""
merge_method: slerp
base_model: {bpe["a"]}
models:
  - model: {bpe["a"]}
  - model: {bpe["b"]}
parameters:
  t: 0.4
tokenizer:
  source: {bpe["b"]}
  pad_to_multiple_of: 64
dtype: float32
""",
        tmp_path,
    )
    _same(ours, theirs)


def _same_by_token(ours: Path, theirs: Path) -> None:
    """The same tokens, and each token's rows equal (mergekit numbers a union's new tokens
    in hash order, different from run to run; shoal in each model's id order)."""
    import torch
    from transformers import AutoTokenizer

    mine = AutoTokenizer.from_pretrained(ours).get_vocab()
    other = AutoTokenizer.from_pretrained(theirs).get_vocab()
    assert sorted(mine) == sorted(other)
    tokens = sorted(mine)
    a, b = state_dict(ours), state_dict(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape, name
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            rows_a = a[name][torch.tensor([mine[t] for t in tokens])]
            rows_b = b[name][torch.tensor([other[t] for t in tokens])]
            assert torch.allclose(rows_a, rows_b, atol=1e-6, rtol=0), name
        else:
            assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name


def test_union_of_word_vocabularies(words: dict[str, Path], tmp_path: Path) -> None:
    """The union of four word vocabularies with TIES: every model's tokens, rows by
    mergekit's rules (the base's, the only model's, the mean of those that have it)."""
    ours, theirs = _both(
        f"""
merge_method: ties
base_model: {words["base"]}
models:
  - model: {words["x"]}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {words["y"]}
    parameters: {{weight: 0.4, density: 0.7}}
  - model: {words["z"]}
    parameters: {{weight: 0.3, density: 0.9}}
tokenizer:
  source: union
dtype: float32
""",
        tmp_path,
    )
    _same_by_token(ours, theirs)


def test_union_of_bpe_vocabularies(bpe: dict[str, Path], tmp_path: Path) -> None:
    """The union of two byte-level BPE vocabularies (a tokenizer block without a source
    means union, as in mergekit), linear without a base."""
    ours, theirs = _both(
        f"""
merge_method: linear
models:
  - model: {bpe["a"]}
    parameters: {{weight: 0.7}}
  - model: {bpe["b"]}
    parameters: {{weight: 0.3}}
tokenizer:
  pad_to_multiple_of: 8
dtype: float32
""",
        tmp_path,
    )
    _same_by_token(ours, theirs)


def test_base_bpe_tokens_past_vocab_size_are_stripped(bpe: dict[str, Path], tmp_path: Path) -> None:
    """The base's tokenizer has three added tokens its model has no rows for: mergekit
    strips them from the base vocabulary, and so does shoal (same files, same tensors)."""
    import shutil

    from transformers import AutoTokenizer

    padded = tmp_path / "padded"
    shutil.copytree(bpe["base"], padded)
    tok = AutoTokenizer.from_pretrained(padded)
    tok.add_tokens(["<x0>", "<x1>", "<x2>"], special_tokens=True)
    tok.save_pretrained(padded)
    ours, theirs = _both(
        f"""
merge_method: task_arithmetic
base_model: {padded}
models:
  - model: {bpe["a"]}
    parameters: {{weight: 0.5}}
  - model: {bpe["b"]}
    parameters: {{weight: 0.5}}
tokenizer_source: base
dtype: float32
""",
        tmp_path,
    )
    _same(ours, theirs)
    assert "<x0>" not in AutoTokenizer.from_pretrained(ours).get_vocab()
