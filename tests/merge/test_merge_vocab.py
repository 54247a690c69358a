"""Merging models whose vocabularies differ: ``tokenizer_source`` and ``tokenizer:``.

Four tiny Llamas with word-level tokenizers that share some tokens under other ids and
lack others. Expected rows are computed here from the models' own tensors and word
lists, token by token (mergekit's rules: a model's own row; else a ``tokens`` entry's
source; else the only model with the token, the base's row, or the mean of the rows of
the models that have it; padding rows the mean of a model's rows).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merge_helpers import state_dict
from vocab_helpers import vocab_model, word_tokenizer

from shoal.errors import MergeError, RecipeError
from shoal.merge import merge_state_dicts, merge_to_disk
from shoal.recipe import load_recipe

SPECIAL = ["<unk>", "<s>", "</s>"]
WORDS = {
    "base": [*SPECIAL, "a", "b", "c", "d", "e"],
    "x": ["<unk>", "<s>", "</s>", "c", "a", "f", "b", "g", "h"],  # no d, e
    "y": ["<unk>", "</s>", "<s>", "e", "a", "b", "c", "q", "f", "r"],  # no d, g, h
    "z": [*SPECIAL, "g", "b", "c", "f", "a"],  # no d, e, h
}
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    return {
        name: vocab_model(root / name, word_tokenizer(words), seed=10 + i)
        for i, (name, words) in enumerate(WORDS.items())
    }


@pytest.fixture(scope="module")
def tensors(models: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: state_dict(path) for name, path in models.items()}


def _row(tensors: dict, model: str, tensor: str, token: str) -> torch.Tensor:
    return tensors[model][tensor][WORDS[model].index(token)].double()


def test_base_vocabulary_rows_by_hand(models, tensors, tmp_path: Path) -> None:
    """task_arithmetic over base, x, y into the base's vocabulary: d only in the base →
    the base's row for x and y; e in base and y → the base's row for x."""
    text = (
        f"merge_method: task_arithmetic\nbase_model: {models['base']}\n"
        f"models:\n  - {{model: {models['x']}, parameters: {{weight: 0.5}}}}\n"
        f"  - {{model: {models['y']}, parameters: {{weight: 0.3}}}}\n"
        "tokenizer_source: base\n"
    )
    out = merge_to_disk(text, tmp_path / "out", progress=False)
    got = state_dict(out)
    for name in VOCAB_TENSORS:
        assert got[name].shape == (8, 32)
        for tid, token in enumerate(WORDS["base"]):
            b = _row(tensors, "base", name, token)
            rows = {}
            for m in ("x", "y"):
                rows[m] = _row(tensors, m, name, token) if token in WORDS[m] else b
            want = b + 0.5 * (rows["x"] - b) + 0.3 * (rows["y"] - b)
            assert torch.allclose(got[name][tid].double(), want, atol=1e-6), (name, token)
    # tensors outside the vocabulary are merged as ever
    up = "model.layers.1.mlp.up_proj.weight"
    b, x, y = (tensors[m][up].double() for m in ("base", "x", "y"))
    assert torch.allclose(got[up].double(), b + 0.5 * (x - b) + 0.3 * (y - b), atol=1e-6)
    _loads_together(out, 8)


def _loads_together(out: Path, rows: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == rows
    assert model.get_input_embeddings().weight.shape[0] == rows
    assert len(tok) <= rows
    ids = tok("a b c", return_tensors="pt").input_ids
    assert int(ids.max()) < rows
    model(ids)  # runs


def test_model_vocabulary_donor_and_mean(models, tensors, tmp_path: Path) -> None:
    """linear over x, y, z (no base) into x's vocabulary: h only in x → x's row for y
    and z; f in all three; g in x and z → their mean for y."""
    text = (
        f"merge_method: linear\nmodels:\n"
        f"  - {{model: {models['x']}, parameters: {{weight: 2.0}}}}\n"
        f"  - {{model: {models['y']}, parameters: {{weight: 1.0}}}}\n"
        f"  - {{model: {models['z']}, parameters: {{weight: 1.0}}}}\n"
        f"tokenizer_source: {models['x']}\n"
    )
    got = merge_state_dicts(text)
    for name in VOCAB_TENSORS:
        assert got[name].shape == (9, 32)
        for tid, token in enumerate(WORDS["x"]):
            having = [m for m in ("x", "y", "z") if token in WORDS[m]]
            if len(having) == 1:
                fill = _row(tensors, having[0], name, token)
            else:
                fill = sum(_row(tensors, m, name, token) for m in having) / len(having)
            rows = {
                m: _row(tensors, m, name, token) if token in WORDS[m] else fill
                for m in ("x", "y", "z")
            }
            want = (2.0 * rows["x"] + rows["y"] + rows["z"]) / 4.0
            assert torch.allclose(got[name][tid].double(), want, atol=1e-6), (name, token)


def test_pad_to_multiple_of(models, tensors, tmp_path: Path) -> None:
    """8 tokens padded to 16 rows: each model's padding rows are the mean of its
    realigned rows, so a task-arithmetic merge's padding rows are the mean of its rows."""
    text = (
        f"merge_method: task_arithmetic\nbase_model: {models['base']}\n"
        f"models: [{{model: {models['x']}}}, {{model: {models['y']}}}]\n"
        "tokenizer: {source: base, pad_to_multiple_of: 16}\n"
    )
    out = merge_to_disk(text, tmp_path / "out", progress=False)
    got = state_dict(out)
    for name in VOCAB_TENSORS:
        t = got[name].double()
        assert t.shape == (16, 32)
        mean = t[:8].mean(0)
        assert torch.allclose(t[8:], mean.expand(8, -1), atol=1e-6), name
    _loads_together(out, 16)


def test_tokens_entries(models, tensors, tmp_path: Path) -> None:
    """A new token taken from the one model that has it, a forced zero row, a forced
    row of another token of another model, an unforced entry that changes nothing."""
    text = (
        f"merge_method: linear\nbase_model: {models['base']}\n"
        f"models: [{{model: {models['base']}}}, {{model: {models['y']}}}]\n"
        "tokenizer:\n  source: base\n  tokens:\n"
        f"    q: {{source: {models['y']}}}\n"
        "    a: {source: {kind: zero}, force: true}\n"
        f"    b: {{source: {{kind: model_token, model: {models['y']}, token: r}}, force: true}}\n"
        f"    c: {{source: {models['y']}}}\n"
    )
    out = merge_to_disk(text, tmp_path / "out", progress=False)
    got = state_dict(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("q") == 8 and len(tok) == 9
    name = "model.embed_tokens.weight"
    e = got[name].double()
    assert e.shape == (9, 32)
    q = _row(tensors, "y", name, "q")
    assert torch.allclose(e[8], q, atol=1e-6)  # both models' row: y's
    assert torch.equal(e[3], torch.zeros(32, dtype=torch.float64))  # a forced to zero
    assert torch.allclose(e[4], _row(tensors, "y", name, "r"), atol=1e-6)  # b ← y's r
    c = (_row(tensors, "base", name, "c") + _row(tensors, "y", name, "c")) / 2
    assert torch.allclose(e[5], c, atol=1e-6)  # not forced, both have it: their own rows
    _loads_together(out, 9)


def test_same_vocabulary_is_unchanged(models, tmp_path: Path) -> None:
    """A tokenizer source over models that share its vocabulary changes nothing."""
    base = models["base"]
    text = f"merge_method: linear\nmodels: [{{model: {base}}}, {{model: {base}}}]\n"
    plain = merge_state_dicts(text)
    with_source = merge_state_dicts(text + f"tokenizer_source: {base}\n")
    assert plain.keys() == with_source.keys()
    for name in plain:
        assert torch.equal(plain[name], with_source[name]), name


def test_different_vocabularies_without_a_source_stay_a_shape_error(models) -> None:
    text = (
        f"merge_method: linear\nmodels: [{{model: {models['base']}}}, {{model: {models['x']}}}]\n"
    )
    with pytest.raises(MergeError, match=r"^tensor '.*': shape \[9, 32\].*tokenizer_source"):
        merge_state_dicts(text)


def test_a_token_source_lacking_the_token_is_one_error(models, tmp_path: Path) -> None:
    text = (
        f"merge_method: linear\nbase_model: {models['base']}\n"
        f"models: [{{model: {models['base']}}}, {{model: {models['x']}}}]\n"
        f"tokenizer:\n  source: base\n  tokens: {{d: {{source: {models['x']}}}}}\n"
    )
    with pytest.raises(MergeError, match=r"^tokenizer\.tokens\.d: token 'd' is not in the vocab"):
        merge_to_disk(text, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("tokenizer", "needle"),
    [
        ("tokenizer_source: union", r"tokenizer_source: 'union' is not supported yet"),
        ("tokenizer: {source: union}", r"tokenizer\.source: 'union' is not supported yet"),
        ("tokenizer: {pad_to_multiple_of: 8}", r"tokenizer\.source: required; .*'union'"),
        ("tokenizer_source: base\ntokenizer: {source: base}", r"tokenizer: give either"),
        ("tokenizer: {source: base, padd: 8}", r"tokenizer\.padd: unknown key"),
        ("tokenizer: {source: base, pad_to_multiple_of: 0}", r"tokenizer\.pad_to_multiple_of"),
        (
            "tokenizer: {source: base, tokens: {a: {force: true}}}",
            r"tokenizer\.tokens\.a\.force: needs",
        ),
        (
            "tokenizer: {source: base, tokens: {a: {source: ./nope}}}",
            r"tokenizer\.tokens\.a\.source: '\./nope'",
        ),
        (
            "tokenizer: {source: base, tokens: {a: {source: {kind: one}}}}",
            r"tokenizer\.tokens\.a\.source\.kind: 'one' is not zero or model_token",
        ),
        (
            "tokenizer: {source: base, tokens: {a: {source: {kind: model_token, model: M}}}}",
            r"tokenizer\.tokens\.a\.source: give exactly one of token or token_id",
        ),
    ],
)
def test_bad_tokenizer_keys_are_one_line(tokenizer: str, needle: str) -> None:
    text = "merge_method: linear\nbase_model: M\nmodels: [{model: M}, {model: N}]\n"
    with pytest.raises(RecipeError, match=r"^recipe: " + needle):
        load_recipe(text + tokenizer + "\n")


def test_cli_error_is_one_line_exit_2(models, tmp_path: Path, shoal_cli) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels: [{{model: {models['base']}}}, {{model: {models['x']}}}]\n"
        "tokenizer: {source: union}\n"
    )
    code, _, err = shoal_cli(["merge", str(recipe), str(tmp_path / "out")])
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "tokenizer.source: 'union' is not supported yet" in lines[0]
    assert not (tmp_path / "out").exists()


def test_stored_recipe_keeps_the_block(models, tmp_path: Path) -> None:
    text = (
        f"merge_method: linear\nmodels: [{{model: {models['base']}}}, {{model: {models['y']}}}]\n"
        f"tokenizer: {{source: {models['y']}, pad_to_multiple_of: 4, "
        "tokens: {d: {source: {kind: zero}}}}\n"
    )
    out = merge_to_disk(text, tmp_path / "out", progress=False)
    again = merge_to_disk(out / "shoal_recipe.yaml", tmp_path / "again", progress=False)
    one, two = state_dict(out), state_dict(again)
    assert one["model.embed_tokens.weight"].shape == (12, 32)  # 10 + d = 11 → 12
    for name in one:
        assert torch.equal(one[name], two[name]), name
