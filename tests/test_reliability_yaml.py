"""Exponent numbers without a dot (``1e308``, ``1e-3``) are numbers in every YAML shoal reads
(issue 18 item 8). PyYAML follows YAML 1.1, where they are strings; Python's own
``float()`` is the reference here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from shoal._yaml import safe_dump, safe_load
from shoal.errors import RecipeError
from shoal.recipe.load import load_recipe, parse_yaml

EXPONENTS = ["1e308", "1e-3", "5E+2", "-2e5", "+3e0", "1.5e3", ".5e1", "2.0E-1", "1_0e2"]
NOT_NUMBERS = ["e5", "1e", "1e5x", "v1e5", "1e+", "1.2.3e4", "0x1e5_"]


@pytest.mark.parametrize("text", EXPONENTS)
def test_exponent_numbers_are_floats(text: str) -> None:
    value = safe_load(f"x: {text}")["x"]
    assert type(value) is float
    assert value == float(text.replace("_", ""))
    assert yaml.safe_load(f"x: {text}")["x"] in (text, value)  # PyYAML itself is unchanged


@pytest.mark.parametrize("text", NOT_NUMBERS)
def test_look_alikes_stay_what_pyyaml_reads(text: str) -> None:
    assert safe_load(f"x: {text}")["x"] == yaml.safe_load(f"x: {text}")["x"]


@pytest.mark.parametrize("text", ["'1e308'", '"1e-3"', "!!str 5E+2"])
def test_a_quoted_exponent_stays_a_string(text: str) -> None:
    assert safe_load(f"x: {text}")["x"] == yaml.safe_load(f"x: {text}")["x"]
    assert isinstance(safe_load(f"x: {text}")["x"], str)


def test_yaml_11_forms_keep_their_values() -> None:
    """Ints, 1.1 floats, inf/nan, booleans: what PyYAML read before is read alike."""
    text = "[12, 0x1F, 0o17, 1_000, 1.0e+5, 1.5, .inf, -.inf, true, ~, 1:30]"
    assert safe_load(text) == yaml.safe_load(text)


def test_dump_quotes_a_string_that_reads_as_a_number() -> None:
    data = {"name": "1e5", "other": "2.5E-3", "value": 1e-5, "big": 1e308}
    text = safe_dump(data, sort_keys=False)
    assert "'1e5'" in text and "'2.5E-3'" in text
    assert safe_load(text) == data


def test_strict_recipe_parser_reads_exponents_and_still_refuses_repeated_keys() -> None:
    assert parse_yaml("a: 1e-3\nb: [2e5]", "r.yaml") == {"a": 0.001, "b": [200000.0]}
    with pytest.raises(RecipeError, match=r"r\.yaml:2:1: .*'a' given twice"):
        parse_yaml("a: 1e-3\na: 2", "r.yaml")


def _recipe(weight_a: str, weight_b: str) -> str:
    return (
        "merge_method: linear\nmodels:\n"
        f"  - model: a\n    parameters: {{weight: {weight_a}}}\n"
        f"  - model: b\n    parameters: {{weight: {weight_b}}}\n"
    )


def test_recipe_weights_in_exponent_form() -> None:
    recipe = load_recipe(_recipe("1e308", "-2e-3"))
    assert recipe.models is not None
    assert [m.parameters["weight"] for m in recipe.models] == [1e308, -0.002]


def test_a_quoted_weight_is_still_refused_naming_the_key() -> None:
    with pytest.raises(RecipeError, match=r"models\[0\]\.parameters\.weight: .*'1e308'"):
        load_recipe(_recipe("'1e308'", "1"))


def test_an_exponent_beyond_float_range_is_refused_as_infinite() -> None:
    with pytest.raises(RecipeError, match=r"models\[0\]\.parameters\.weight: .*finite"):
        load_recipe(_recipe("1e999", "1"))


def _model(root: Path, name: str, seed: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    path = root / name
    path.mkdir()
    save_file({"model.norm.weight": torch.randn(8, generator=gen)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def test_merge_with_exponent_weights_equals_the_decimal_recipe(tmp_path: Path, shoal_cli) -> None:
    """``5e-1`` / ``25E-2`` merge exactly as ``0.5`` / ``0.25``."""
    a, b = _model(tmp_path, "a", 1), _model(tmp_path, "b", 2)
    outs = {}
    for tag, (wa, wb) in {"exp": ("5e-1", "25E-2"), "dec": ("0.5", "0.25")}.items():
        recipe = tmp_path / f"{tag}.yaml"
        text = _recipe(wa, wb).replace("model: a", f"model: {a}").replace("model: b", f"model: {b}")
        recipe.write_text(text + "parameters: {normalize: false}\n")
        code, _, err = shoal_cli(["merge", str(recipe), str(tmp_path / tag), "-q"])
        assert code == 0, err
        outs[tag] = load_file(str(tmp_path / tag / "model.safetensors"))["model.norm.weight"]
    sa = load_file(str(a / "model.safetensors"))["model.norm.weight"]
    sb = load_file(str(b / "model.safetensors"))["model.norm.weight"]
    assert torch.equal(outs["exp"], outs["dec"])
    assert torch.allclose(outs["exp"], 0.5 * sa + 0.25 * sb)


def test_a_stored_recipe_keeps_a_model_named_like_a_number(tmp_path: Path) -> None:
    """shoal_recipe.yaml and a run's best recipe are written with the quoting dumper, so
    a model folder named ``1e5`` reads back as that name, not as the number 100000.0."""
    from shoal.recipe import Recipe

    recipe = Recipe.model_validate(
        {"merge_method": "linear", "models": [{"model": "1e5", "parameters": {"weight": 1.0}}]}
    )
    text = recipe.to_yaml()
    assert safe_load(text)["models"][0]["model"] == "1e5"
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert load_recipe(path).models[0].model == "1e5"
