"""Recipe parsing: mergekit-style YAML for every method, and every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shoal.errors import RecipeError
from shoal.recipe import METHODS, Recipe, load_recipe

EXAMPLES: dict[str, str] = {
    "linear": """
models:
  - model: a
    parameters: {weight: 0.7}
  - model: b
    parameters: {weight: 0.3}
merge_method: linear
dtype: float16
""",
    "task_arithmetic": """
models:
  - model: a
    parameters: {weight: 0.5}
  - model: b
    parameters: {weight: [0, 1]}
base_model: base
merge_method: task_arithmetic
parameters: {lambda: 1.2}
""",
    "ties": """
models:
  - model: a
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: b
    parameters:
      density: 0.5
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
base_model: base
merge_method: ties
parameters: {normalize: true, int8_mask: true}
dtype: bfloat16
""",
    "dare_ties": """
models:
  - model: base
  - model: a
    parameters: {weight: 0.5, density: 0.53}
  - model: b
    parameters: {weight: 0.4, density: 0.53}
base_model: base
merge_method: dare_ties
parameters: {rescale: true}
""",
    "dare_linear": """
models:
  - model: a
    parameters: {weight: 0.5, density: 0.3}
base_model: base
merge_method: dare_linear
parameters: {rescale: inverse_density}
""",
    "breadcrumbs": """
models:
  - model: a
    parameters: {weight: 1, density: 0.9, gamma: 0.01}
base_model: base
merge_method: breadcrumbs
""",
    "breadcrumbs_ties": """
models:
  - model: a
    parameters: {weight: 1, density: 0.9, gamma: 0.02}
  - model: b
    parameters: {weight: 1, density: 0.8}
base_model: base
merge_method: breadcrumbs_ties
""",
    "slerp": """
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
      - model: b
        layer_range: [0, 2]
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
    "della": """
models:
  - model: a
    parameters: {weight: 0.6, density: 0.5, epsilon: 0.1}
  - model: b
    parameters: {weight: 0.4, density: [0.3, 0.7]}
base_model: base
merge_method: della
parameters: {lambda: 0.9, rescale: true}
dtype: bfloat16
""",
    "della_linear": """
models:
  - model: a
    parameters: {weight: 1, density: 0.5, epsilon: 0.2}
base_model: base
merge_method: della_linear
parameters: {rescale: inverse_density, normalize: true}
""",
    "karcher": """
models:
  - model: a
  - model: b
base_model: base
merge_method: karcher
parameters: {max_iter: 20, tol: 1.0e-6}
""",
    "multislerp": """
models:
  - model: a
    parameters: {weight: 0.7}
  - model: b
    parameters: {weight: [0.1, 0.3]}
base_model: base
merge_method: multislerp
parameters: {normalize_weights: false, eps: 1.0e-7}
""",
    "nearswap": """
models:
  - model: base
  - model: a
base_model: base
merge_method: nearswap
parameters: {t: [0.0001, 0.001]}
""",
    "nuslerp": """
models:
  - model: base
  - model: a
    parameters: {weight: 0.4}
  - model: b
    parameters: {weight: 0.6}
base_model: base
merge_method: nuslerp
parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}
""",
    "sce": """
models:
  - model: a
  - model: b
base_model: base
merge_method: sce
parameters: {select_topk: [0.2, 0.8], int8_mask: true}
""",
    "model_stock": """
models:
  - model: a
  - model: b
base_model: base
merge_method: model_stock
""",
    "arcee_fusion": """
models:
  - model: a
base_model: base
merge_method: arcee_fusion
dtype: bfloat16
""",
    "passthrough": """
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
  - sources:
      - model: b
        layer_range: [1, 2]
        parameters: {scale: 0.5}
merge_method: passthrough
""",
    "splitpoint": """
models:
  - model: a
  - model: b
merge_method: splitpoint
parameters: {split: 0.31, ratio: 0.7, angle: global}
""",
}


def test_every_registered_method_has_an_example() -> None:
    assert set(EXAMPLES) == set(METHODS)


@pytest.mark.parametrize("method", sorted(EXAMPLES))
def test_example_parses_and_round_trips(method: str) -> None:
    recipe = load_recipe(EXAMPLES[method])
    assert recipe.merge_method == method
    again = load_recipe(recipe.to_yaml())
    assert again == recipe
    assert again.content_hash() == recipe.content_hash()
    assert load_recipe(recipe.to_dict()) == recipe


def test_values_normalised_and_hash_ignores_spelling() -> None:
    a = load_recipe(EXAMPLES["dare_ties"])
    assert a.parameters == {"rescale": "l1"}  # mergekit's `true` is its L1 rescale
    b = load_recipe(EXAMPLES["dare_ties"].replace("rescale: true", "rescale: l1"))
    assert a.content_hash() == b.content_hash()
    c = load_recipe(EXAMPLES["dare_ties"].replace("weight: 0.5", "weight: 0.50000"))
    assert c.content_hash() == a.content_hash()
    d = load_recipe(EXAMPLES["dare_ties"].replace("weight: 0.5", "weight: 0.6"))
    assert d.content_hash() != a.content_hash()
    assert len(a.content_hash()) == 64


def test_dtype_aliases() -> None:
    r = load_recipe(EXAMPLES["linear"].replace("float16", "bf16"))
    assert r.dtype == "bfloat16"
    assert r.output_dtype() == "bfloat16"


def test_model_refs_order_and_uniqueness() -> None:
    assert load_recipe(EXAMPLES["dare_ties"]).model_refs() == ["base", "a", "b"]
    assert load_recipe(EXAMPLES["passthrough"]).model_refs() == ["a", "b"]


def test_load_from_file_keeps_directory(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(EXAMPLES["ties"])
    recipe = load_recipe(path)
    assert recipe.source_dir == tmp_path.resolve()
    assert load_recipe(str(path)) == recipe


def _error(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(text)
    message = str(info.value)
    assert "\n" not in message
    return message


BAD = [
    (EXAMPLES["ties"].replace("merge_method: ties", "merge_method: tiez"), "merge_method"),
    (EXAMPLES["ties"].replace("dtype:", "dtpye:"), "dtpye: unknown key"),
    (
        EXAMPLES["ties"].replace("density: 0.5", "densty: 0.5"),
        "models[1].parameters.densty: unknown parameter for ties",
    ),
    (EXAMPLES["ties"].replace("- model: b", "- model: b\n    weigth: 1"), "models[1].weigth"),
    (
        EXAMPLES["slerp"].replace(
            "layer_range: [0, 2]\n      - model: b", "layer_rang: [0, 2]\n      - model: b"
        ),
        "slices[0].sources[0]",
    ),
    (EXAMPLES["ties"].replace("weight: 1.0", "weight: heavy"), "models[0].parameters.weight"),
    (EXAMPLES["ties"].replace("normalize: true", "normalize: 2"), "parameters.normalize"),
    (EXAMPLES["ties"].replace("density: 0.5", "density: 1.5"), "models[1].parameters.density"),
    (EXAMPLES["ties"].replace("[1, 0.7, 0.1]", "[1, -0.7, 0.1]"), "density[1]"),
    (EXAMPLES["slerp"].replace("- value: 0.5", "- value: 1.5"), "parameters.t[2].value"),
    (EXAMPLES["ties"].replace("base_model: base\n", ""), "base_model: required by ties"),
    (EXAMPLES["slerp"].replace("t:\n", "tt:\n"), "parameters.tt: unknown parameter for slerp"),
    (
        EXAMPLES["model_stock"].replace("  - model: b\n", ""),
        "model_stock needs at least 2 models",
    ),
    (EXAMPLES["ties"].replace("dtype: bfloat16", "dtype: int3"), "dtype: unknown dtype"),
    (EXAMPLES["ties"] + "tokenizer_source: model:x\n", "tokenizer_source"),
    (EXAMPLES["dare_ties"].replace("rescale: true", "rescale: l2"), "parameters.rescale"),
    (
        EXAMPLES["ties"].replace("weight: 1.0", "weight: 1.0\n      normalize: true"),
        "models[0].parameters.normalize: normalize is a global parameter",
    ),
    (EXAMPLES["splitpoint"].replace("split: 0.31, ", ""), "parameters.split: required"),
    (
        EXAMPLES["slerp"].replace(
            "[0, 2]\n      - model: b\n        layer_range: [0, 2]",
            "[0, 2]\n      - model: b\n        layer_range: [0, 3]",
        ),
        "same number of layers",
    ),
    (EXAMPLES["passthrough"].replace("[1, 2]", "[2, 2]"), "slices[1].sources[0].layer_range"),
    ("merge_method: linear\n", "give exactly one of models: or slices:"),
    ("- just\n- a list\n", "a recipe is a mapping"),
    ("models: [\n", "not valid YAML"),
]


@pytest.mark.parametrize(("text", "needle"), BAD, ids=[n for _, n in BAD])
def test_bad_input_names_the_key(text: str, needle: str) -> None:
    assert needle in _error(text)


def test_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert str(missing) in _error(str(missing))


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(EXAMPLES["ties"].replace("density: 0.5", "density: 2"))
    with pytest.raises(RecipeError, match=r"bad\.yaml: models\[1\]\.parameters\.density"):
        load_recipe(path)


def test_recipe_is_frozen_data() -> None:
    recipe = load_recipe(EXAMPLES["linear"])
    assert isinstance(recipe, Recipe)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type
        recipe.merge_method = "ties"  # type: ignore[misc]
    assert yaml.safe_load(recipe.to_yaml())["merge_method"] == "linear"


def test_parse_yaml_refuses_repeated_keys_and_keeps_merge_keys() -> None:
    from shoal.errors import RecipeError
    from shoal.recipe import parse_yaml

    anchors = "a: &x {b: 1, c: 2}\nd:\n  <<: *x\n  c: 3\n"
    assert parse_yaml(anchors, "f.yaml") == {"a": {"b": 1, "c": 2}, "d": {"b": 1, "c": 3}}
    with pytest.raises(RecipeError, match=r"^f\.yaml:3:1: not valid YAML: key 'a' given twice$"):
        parse_yaml("a: 1\nb: 2\na: 3\n", "f.yaml")
    with pytest.raises(RecipeError, match=r"^f\.yaml:1:2: .*plain value"):
        parse_yaml("{[a]: 1}", "f.yaml")
    with pytest.raises(RecipeError, match=r"^f\.yaml:2:\d+: not valid YAML: "):
        parse_yaml("a: [1\nb: 2\n", "f.yaml")


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_mergekit_methods_shoal_lacks_are_refused_by_name(method: str) -> None:
    from shoal.errors import RecipeError

    text = f"merge_method: {method}\nbase_model: ./base\nmodels:\n  - model: ./a\n  - model: ./b\n"
    with pytest.raises(RecipeError, match=f"merge_method: unknown method '{method}'"):
        load_recipe(text)
