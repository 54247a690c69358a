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


def test_union_vocabulary_rows_by_hand(models, tensors, tmp_path: Path) -> None:
    """task_arithmetic over base, x, y into the union: the base's tokens keep their ids,
    x's new tokens f g h follow in x's id order, then y's q r; each row of a new token is
    the row of the only model that has it, or the mean of those that have it (f: x, y)."""
    text = (
        f"merge_method: task_arithmetic\nbase_model: {models['base']}\n"
        f"models:\n  - {{model: {models['x']}, parameters: {{weight: 0.5}}}}\n"
        f"  - {{model: {models['y']}, parameters: {{weight: 0.3}}}}\n"
        "tokenizer: {source: union}\n"
    )
    out = merge_to_disk(text, tmp_path / "out", progress=False)
    from transformers import AutoTokenizer

    union = [*WORDS["base"], "f", "g", "h", "q", "r"]
    tok = AutoTokenizer.from_pretrained(out)
    assert [tok.convert_ids_to_tokens(i) for i in range(len(tok))] == union
    got = state_dict(out)
    for name in VOCAB_TENSORS:
        assert got[name].shape == (len(union), 32)
        for tid, token in enumerate(union):
            having = [m for m in ("base", "x", "y") if token in WORDS[m]]
            if "base" in having:
                fill = _row(tensors, "base", name, token)
            else:
                fill = sum(_row(tensors, m, name, token) for m in having) / len(having)
            r = {m: _row(tensors, m, name, token) if m in having else fill for m in having}
            r = {m: r.get(m, fill) for m in ("base", "x", "y")}
            want = r["base"] + 0.5 * (r["x"] - r["base"]) + 0.3 * (r["y"] - r["base"])
            assert torch.allclose(got[name][tid].double(), want, atol=1e-6), (name, token)
    _loads_together(out, len(union))


def test_union_keeps_the_plain_merge_on_shared_tokens(models, tmp_path: Path) -> None:
    """Two models with one vocabulary plus different added tokens: on text of the shared
    tokens the union merge's logits equal the plain merge's; each new token's rows are
    those of the model that added it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path / "added"
    merged = {}
    for name, extra in (("p", ["<think>", "<tool>"]), ("s", ["<tool>", "<answer>"])):
        tok = word_tokenizer(WORDS["base"])
        tok.add_tokens(extra, special_tokens=True)
        merged[name] = vocab_model(root / name, tok, seed=40 + len(merged))
    base_text = (
        f"merge_method: linear\nmodels: [{{model: {merged['p']}}}, {{model: {merged['s']}}}]\n"
    )
    # the plain merge over the shared rows: both models cut to the base's 8 tokens
    cut = {}
    for name, path in merged.items():
        sd = state_dict(path)
        cut[name] = {k: (v[:8] if k in VOCAB_TENSORS else v) for k, v in sd.items()}
    p_rows = state_dict(merged["p"])
    s_rows = state_dict(merged["s"])
    union = merge_to_disk(base_text + "tokenizer: {}\n", tmp_path / "u", progress=False)
    tok = AutoTokenizer.from_pretrained(union)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<think>", "<tool>", "<answer>")}
    assert sorted(ids.values()) == [8, 9, 10] and len(tok) == 11
    got = state_dict(union)
    for name in VOCAB_TENSORS:
        plain = (cut["p"][name] + cut["s"][name]) / 2
        assert torch.allclose(got[name][:8], plain, atol=1e-6), name
        # <think> only in p, <answer> only in s, <tool> in both (row 9 in p, 8 in s)
        p_think = p_rows[name][8]
        s_answer = s_rows[name][9]
        tool = (p_rows[name][9] + s_rows[name][8]) / 2
        assert torch.allclose(got[name][ids["<think>"]], p_think, atol=1e-6)
        assert torch.allclose(got[name][ids["<answer>"]], s_answer, atol=1e-6)
        assert torch.allclose(got[name][ids["<tool>"]], tool, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(union)
    reference = AutoModelForCausalLM.from_pretrained(merged["p"])
    reference.resize_token_embeddings(8)
    with torch.no_grad():
        for name, param in reference.state_dict().items():
            param.copy_((cut["p"][name] + cut["s"][name]) / 2)
        words = torch.tensor([[3, 4, 5, 6, 7, 1]])
        assert torch.allclose(model(words).logits[..., :8], reference(words).logits, atol=1e-5)
    assert model.config.vocab_size == len(tok)
    # a tokens: entry names the source of a new token's rows for the model that lacks it
    named = merge_to_disk(
        base_text + "tokenizer:\n  source: union\n  tokens:\n"
        f"    <answer>: {{source: {{kind: model_token, model: {merged['p']}, token: <think>}}}}\n",
        tmp_path / "named",
        progress=False,
    )
    rows = state_dict(named)
    for name in VOCAB_TENSORS:  # p lacks <answer>: its row is p's <think>; s keeps its own
        want = (p_rows[name][8] + s_rows[name][9]) / 2
        assert torch.allclose(rows[name][ids["<answer>"]], want, atol=1e-6), name
        assert torch.equal(rows[name][:8], got[name][:8])


def test_base_tokens_past_vocab_size_are_stripped(models, tensors, tmp_path: Path) -> None:
    """A base whose tokenizer holds two added tokens past its model's 8 rows: with
    ``tokenizer_source: base`` (and union) they leave the output vocabulary, which keeps
    the base's 8 tokens (mergekit's rule); the rows are the plain merge's."""
    import shutil

    from transformers import AutoTokenizer

    padded = tmp_path / "padded"
    shutil.copytree(models["base"], padded)
    tok = AutoTokenizer.from_pretrained(padded)
    tok.add_tokens(["<extra_0>", "<extra_1>"], special_tokens=True)
    tok.save_pretrained(padded)
    assert len(AutoTokenizer.from_pretrained(padded)) == 10  # the model has 8 rows
    for i, source in enumerate(("tokenizer_source: base", "tokenizer: {source: union}")):
        text = (
            f"merge_method: linear\nbase_model: {padded}\n"
            f"models: [{{model: {padded}}}, {{model: {models['base']}}}]\n{source}\n"
        )
        out = merge_to_disk(text, tmp_path / f"out{i}", progress=False)
        got = AutoTokenizer.from_pretrained(out)
        assert got.get_vocab() == {w: i for i, w in enumerate(WORDS["base"])}, source
        for name in VOCAB_TENSORS:  # both models are the base: the merge is the base
            assert torch.allclose(state_dict(out)[name], tensors["base"][name], atol=1e-6)
        _loads_together(out, 8)


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
        ("tokenizer_source: model:M", r"tokenizer_source: 'model:M' is not supported"),
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
        "tokenizer: {source: union, tokens: {zz: {source: {kind: model_token, "
        f"model: {models['x']}, token: nope}}}}}}}}\n"
    )
    code, _, err = shoal_cli(["merge", str(recipe), str(tmp_path / "out")])
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "tokenizer.tokens.zz.source.token: 'nope'" in lines[0], lines
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
