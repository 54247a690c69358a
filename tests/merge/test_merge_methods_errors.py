"""Bad recipes of the methods of issue #14 through ``shoal merge RECIPE OUT``.

For each method: a missing required parameter (where the method has one), a value out of
its range (or of the wrong type where no parameter has a range; an unknown parameter for
arcee_fusion, which has none) and a wrong number of models each end in exit code 2, one
line on stderr that names the key, and nothing at OUT.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def _models(paths: dict[str, Path], names: tuple[str, ...], params: str = "") -> str:
    extra = f"\n    parameters: {{{params}}}" if params else ""
    return "".join(f"\n  - model: {paths[n]}{extra}" for n in names)


def _recipe(
    paths: dict[str, Path],
    method: str,
    names: tuple[str, ...] = ("a", "b"),
    *,
    base: bool = True,
    params: str = "",
    per_model: str = "",
) -> str:
    listed = _models(paths, names, per_model) if names else " []"
    text = f"merge_method: {method}\nmodels:{listed}\n"
    if base:
        text += f"base_model: {paths['base']}\n"
    if params:
        text += f"parameters: {{{params}}}\n"
    return text


# (method, what is wrong) → (recipe keyword arguments, needles of the error line)
CASES: dict[tuple[str, str], tuple[dict, tuple[str, ...]]] = {
    # arcee_fusion has no parameters: any it is given and no method knows is the bad value
    ("arcee_fusion", "unknown"): (
        {"names": ("a",), "params": "threshold: 2"},
        ("parameters.threshold", "unknown parameter for arcee_fusion (known: none)"),
    ),
    ("arcee_fusion", "count"): (
        {},
        ("models", "arcee_fusion needs exactly 1 models besides base_model", "got 2"),
    ),
    ("sce", "range"): ({"params": "select_topk: 1.5"}, ("parameters.select_topk", "[0, 1]")),
    ("sce", "count"): ({"names": ("base",)}, ("models", "sce needs at least 1", "got 0")),
    ("della", "range"): (
        {"per_model": "weight: 0.5, epsilon: 0.7"},
        ("models[0].parameters.epsilon", "[0, 0.5]"),
    ),
    ("della", "count"): ({"names": ("base",)}, ("models", "della needs at least 1", "got 0")),
    # density ± epsilon leaves (0, 1): known once the values of a tensor are resolved
    ("della", "pair"): (
        {"per_model": "density: 0.1, epsilon: 0.15"},
        ("tensor", "density ± epsilon", "density 0.1, epsilon 0.15"),
    ),
    ("karcher", "range"): ({"params": "tol: -0.1"}, ("parameters.tol", "[0, inf]")),
    ("karcher", "type"): ({"params": "max_iter: 2.5"}, ("tensor", "max_iter", "whole number")),
    ("karcher", "count"): ({"names": (), "base": False}, ("models", "karcher needs at least 1")),
    ("multislerp", "range"): ({"params": "eps: -1"}, ("parameters.eps", "[0, inf]")),
    ("multislerp", "type"): (
        {"params": "normalize_weights: 3"},
        ("parameters.normalize_weights", "true or false"),
    ),
    ("multislerp", "count"): ({"names": ()}, ("models", "multislerp needs at least 1", "got 0")),
    ("nuslerp", "type"): (
        {"params": "nuslerp_flatten: rows"},
        ("parameters.nuslerp_flatten", "true or false"),
    ),
    ("nuslerp", "count"): (
        {"names": ("a", "b", "a")},
        ("models", "nuslerp needs exactly 2 models besides base_model", "got 3"),
    ),
    ("nuslerp", "count-no-base"): (
        {"names": ("a",), "base": False},
        ("models", "nuslerp needs exactly 2 models", "got 1"),
    ),
    ("nearswap", "missing"): ({"names": ("a",)}, ("parameters.t", "required by nearswap")),
    ("nearswap", "range"): (
        {"names": ("a",), "params": "t: -0.5"},
        ("parameters.t", "[0, inf]", "-0.5"),
    ),
    ("nearswap", "count"): (
        {"params": "t: 0.1"},
        ("models", "nearswap needs exactly 1 models besides base_model", "got 2"),
    ),
    ("della_linear", "range"): (
        {"per_model": "density: 1.5"},
        ("models[0].parameters.density", "[0, 1]"),
    ),
    ("della_linear", "type"): ({"params": "rescale: l2"}, ("parameters.rescale", "l1")),
    ("della_linear", "count"): (
        {"names": ("base",)},
        ("models", "della_linear needs at least 1", "got 0"),
    ),
}


@pytest.mark.parametrize(
    ("method", "wrong"), sorted(CASES), ids=[f"{m}-{w}" for m, w in sorted(CASES)]
)
def test_bad_recipe_is_one_line_exit_2_nothing_written(
    method: str, wrong: str, llama: dict[str, Path], tmp_path: Path, shoal_cli
) -> None:
    kwargs, needles = CASES[(method, wrong)]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(_recipe(llama, method, **kwargs))
    out = tmp_path / "out"
    code, _, err = shoal_cli(["merge", str(recipe), str(out)])
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_every_new_method_has_its_bad_cases() -> None:
    """Each method has a bad value and a bad model count, and a missing-parameter case
    exactly when it has a required parameter."""
    from shoal.recipe import METHODS

    new = {"sce", "della", "della_linear", "nearswap", "karcher", "multislerp", "nuslerp"}
    assert {m for m, _ in CASES} == new | {"arcee_fusion"}
    for method in {m for m, _ in CASES}:
        wrongs = {w for m, w in CASES if m == method}
        required = any(p.default is None for p in METHODS[method].params)
        assert "count" in wrongs and ({"range", "type", "unknown"} & wrongs), method
        assert ("missing" in wrongs) == required, method
