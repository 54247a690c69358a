"""Non-weight files of the output: config, tokenizer source, chat template, model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from shoal.errors import RecipeError
from shoal.merge import merge_to_disk
from shoal.recipe import load_recipe


def _model(root: Path, name: str, seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    path = root / name
    path.mkdir()
    save_file(
        {
            "model.embed_tokens.weight": torch.randn(8, 4, generator=gen),
            "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=gen),
            "model.norm.weight": torch.randn(4, generator=gen),
        },
        str(path / "model.safetensors"),
    )
    config = {"model_type": "llama", "num_hidden_layers": 1, "torch_dtype": "float32", "who": name}
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer_config.json").write_text(json.dumps({"who": name}))
    (path / "special_tokens_map.json").write_text(json.dumps({"who": name}))
    return path


def test_tokenizer_source_config_and_card(tmp_path: Path) -> None:
    base, a, b = (_model(tmp_path, n, i) for i, n in enumerate(("base", "a", "b")))
    for i, path in enumerate((base, a, b)):  # one vocabulary, told apart by model_max_length
        _real_tokenizer(path, words=8, max_length=100 + i)
    text = (
        f"merge_method: task_arithmetic\nbase_model: {base}\n"
        f"models: [{{model: {a}}}, {{model: {b}}}]\n"
        f"tokenizer_source: {a}\nchat_template: '{{{{ messages }}}}'\ndtype: bfloat16\n"
    )
    out = merge_to_disk(text, tmp_path / "out", seed=5, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["who"] == "base" and config["torch_dtype"] == "bfloat16"
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 101
    assert (out / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()
    assert config["vocab_size"] == 8
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
    stored = load_recipe(out / "shoal_recipe.yaml")
    assert stored == load_recipe(text)
    assert yaml.safe_load((out / "shoal_recipe.yaml").read_text())["merge_method"] == (
        "task_arithmetic"
    )
    card = (out / "README.md").read_text()
    assert stored.content_hash() in card and "seed: 5" in card and str(a) in card


def test_tokenizer_from_base_by_default(tmp_path: Path) -> None:
    base, a = _model(tmp_path, "base", 0), _model(tmp_path, "a", 1)
    text = f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
    out = merge_to_disk(text, tmp_path / "out", progress=False)
    assert json.loads((out / "tokenizer_config.json").read_text())["who"] == "base"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "shoal_recipe.yaml",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ]


def test_relative_paths_resolve_next_to_the_recipe(tmp_path: Path, monkeypatch) -> None:
    _model(tmp_path, "base", 0)
    _model(tmp_path, "a", 1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: linear\nmodels: [{model: base}, {model: a}]\n")
    monkeypatch.chdir(tmp_path.parent)  # not where the models are
    out = merge_to_disk(recipe, tmp_path / "out", progress=False)
    assert (out / "model.safetensors").is_file()


def test_tokenizer_files_come_from_one_model_only(tmp_path: Path) -> None:
    """A base with one more tokenizer file than the source: the output has the source's."""
    base, a = _model(tmp_path, "base", 0), _model(tmp_path, "a", 1)
    _real_tokenizer(base, words=8)
    (base / "vocab.txt").write_text("a file only the base has\n")
    _real_tokenizer(a, words=8)
    text = f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
    out = merge_to_disk(text + f"tokenizer_source: {a}\n", tmp_path / "out", progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "shoal_recipe.yaml",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert json.loads((out / "config.json").read_text())["who"] == "base"


def test_a_tokenizer_source_without_a_tokenizer_is_refused(tmp_path: Path, monkeypatch) -> None:
    import shoal.merge.to_disk as to_disk

    def no_merging(*args, **kwargs):
        raise AssertionError("merged before the tokenizer source was checked")

    monkeypatch.setattr(to_disk, "iter_merged", no_merging)
    base, a = _model(tmp_path, "base", 0), _model(tmp_path, "a", 1)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (a / name).unlink()
    text = f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
    with pytest.raises(RecipeError, match=r"^tokenizer_source: .*holds no tokenizer files"):
        merge_to_disk(text + f"tokenizer_source: {a}\n", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_stored_recipe_rebuilds_a_merge_made_with_command_options(tmp_path: Path) -> None:
    """--dtype goes into the stored recipe; the seed DARE drew with is in its first line."""
    from safetensors.torch import load_file

    base, a, b = (_model(tmp_path, n, i) for i, n in enumerate(("base", "a", "b")))
    text = (
        f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
        f"  - {{model: {a}, parameters: {{weight: 0.7, density: 0.4}}}}\n"
        f"  - {{model: {b}, parameters: {{weight: 0.5, density: 0.6}}}}\n"
    )
    first = merge_to_disk(text, tmp_path / "first", seed=7, dtype="bf16", progress=False)
    stored = first / "shoal_recipe.yaml"
    assert stored.read_text().splitlines()[0] == (
        "# rebuild: shoal merge shoal_recipe.yaml OUT --seed 7"
    )
    assert load_recipe(stored).out_dtype == "bfloat16"
    again = merge_to_disk(stored, tmp_path / "again", seed=7, progress=False)
    one, two = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        assert one[name].dtype == torch.bfloat16
        assert torch.equal(one[name], two[name]), name
    other = load_file(
        merge_to_disk(stored, tmp_path / "other", seed=8, progress=False) / "model.safetensors"
    )
    assert not torch.equal(
        other["model.layers.0.mlp.up_proj.weight"], one["model.layers.0.mlp.up_proj.weight"]
    )


def _real_tokenizer(
    model_dir: Path, template: str | None = None, words: int = 5, max_length: int = 512
) -> None:
    """A word-level tokenizer of ``words`` tokens saved as transformers saves one (with a
    chat template)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["<unk>", "<s>", "</s>", "hi", "there"] + [f"w{i}" for i in range(words - 5)]
    vocab = {w: i for i, w in enumerate(names)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=max_length,
    )
    if template is not None:
        tok.chat_template = template
    for stale in model_dir.glob("*token*"):
        stale.unlink()
    tok.save_pretrained(model_dir)


def test_builtin_chat_template_is_what_the_tokenizer_renders(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    base, a = _model(tmp_path, "base", 0), _model(tmp_path, "a", 1)
    _real_tokenizer(base, "{{ 'base template' }}")
    text = f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
    out = merge_to_disk(text + "chat_template: chatml\n", tmp_path / "out", progress=False)
    chat = [{"role": "user", "content": "hi"}]
    rendered = AutoTokenizer.from_pretrained(out).apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_auto_chat_template_takes_the_one_most_models_carry(tmp_path: Path) -> None:
    base, a, b = (_model(tmp_path, n, i) for i, n in enumerate(("base", "a", "b")))
    _real_tokenizer(base, "{{ 'one' }}")
    _real_tokenizer(a, "{{ 'two' }}")
    (b / "chat_template.jinja").write_text("{{ 'two' }}")
    text = f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
    out = merge_to_disk(text + "chat_template: auto\n", tmp_path / "out", progress=False)
    assert (out / "chat_template.jinja").read_text() == "{{ 'two' }}"


def test_chat_templates_transformers_renders_are_accepted() -> None:
    from shoal.recipe.chat_templates import check_chat_template

    loop = "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% endfor %}"
    tagged = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    check_chat_template(loop)  # loopcontrols, as transformers compiles templates
    check_chat_template(tagged)  # transformers' own {% generation %} tag


@pytest.mark.parametrize(
    ("value", "needle"),
    [("chatmll", "neither a known name"), ("'{% for m in %}'", "not a valid Jinja template")],
)
def test_unknown_chat_template_is_refused(tmp_path: Path, value: str, needle: str) -> None:
    base, a = _model(tmp_path, "base", 0), _model(tmp_path, "a", 1)
    text = f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}]\n"
    with pytest.raises(RecipeError, match=rf"^recipe: chat_template: .*{needle}"):
        load_recipe(text + f"chat_template: {value}\n")
