"""How a method's base flags plan its inputs, merged in memory and checked against the ops.

``base_as_model`` (karcher): a ``base_model`` is one more model, after the listed ones.
``optional_base`` (multislerp, nuslerp): a ``base_model`` is the origin of the task
vectors; without one the models are merged as they are. (mergekit 0.1.5 plans them so.)
"""

from __future__ import annotations

import pytest
import torch

from shoal.errors import MergeError, RecipeError
from shoal.merge import merge_state_dicts
from shoal.ops import karcher, multislerp, nuslerp_merge
from shoal.recipe import load_recipe

NAMES = ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight")


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(6, 4, generator=g) for n in NAMES}


SOURCES = {"base": _sd(0), "a": _sd(1), "b": _sd(2)}


def _merge(text: str) -> dict[str, torch.Tensor]:
    return merge_state_dicts(text, SOURCES)


def test_karcher_averages_a_base_model_as_one_more_model() -> None:
    with_base = _merge("merge_method: karcher\nbase_model: base\nmodels: [{model: a}, {model: b}]")
    without = _merge("merge_method: karcher\nmodels: [{model: a}, {model: b}]")
    for n in NAMES:
        a, b, base = SOURCES["a"][n], SOURCES["b"][n], SOURCES["base"][n]
        torch.testing.assert_close(with_base[n], karcher([a, b, base]), atol=0, rtol=0)
        torch.testing.assert_close(without[n], karcher([a, b]), atol=0, rtol=0)
    # listed among the models, the base keeps its place
    listed = _merge(
        "merge_method: karcher\nbase_model: base\nmodels: [{model: base}, {model: a}, {model: b}]"
    )
    n = NAMES[0]
    torch.testing.assert_close(
        listed[n], karcher([SOURCES[m][n] for m in ("base", "a", "b")]), atol=0, rtol=0
    )


@pytest.mark.parametrize("listed", [False, True])
def test_multislerp_takes_task_vectors_from_a_base_model(listed: bool) -> None:
    models = "[{model: base}, {model: a}, {model: b}]" if listed else "[{model: a}, {model: b}]"
    out = _merge(f"merge_method: multislerp\nbase_model: base\nmodels: {models}")
    plain = _merge("merge_method: multislerp\nmodels: [{model: a}, {model: b}]")
    for n in NAMES:
        a, b, base = SOURCES["a"][n], SOURCES["b"][n], SOURCES["base"][n]
        torch.testing.assert_close(out[n], multislerp([a, b], [1, 1], base), atol=0, rtol=0)
        torch.testing.assert_close(plain[n], multislerp([a, b], [1, 1]), atol=0, rtol=0)


def test_nuslerp_counts_a_listed_base_apart() -> None:
    """nuslerp takes exactly two models: a base_model listed with them is not a third."""
    out = _merge(
        "merge_method: nuslerp\nbase_model: base\n"
        "models: [{model: base}, {model: a, parameters: {weight: 1}}, "
        "{model: b, parameters: {weight: 3}}]"
    )
    plain = _merge("merge_method: nuslerp\nmodels: [{model: a}, {model: b}]")
    for n in NAMES:
        a, b, base = SOURCES["a"][n], SOURCES["b"][n], SOURCES["base"][n]
        torch.testing.assert_close(out[n], nuslerp_merge([a, b], [1, 3], base), atol=0, rtol=0)
        torch.testing.assert_close(plain[n], nuslerp_merge([a, b], [1, 1]), atol=0, rtol=0)
    with pytest.raises(RecipeError, match="nuslerp needs exactly 2 models, got 3"):
        load_recipe("merge_method: nuslerp\nmodels: [{model: base}, {model: a}, {model: b}]")


def test_an_optional_base_missing_from_a_slice_is_refused() -> None:
    text = """
merge_method: multislerp
base_model: base
slices:
  - sources:
      - {model: a, layer_range: [0, 2]}
      - {model: b, layer_range: [0, 2]}
"""
    with pytest.raises(MergeError, match="base_model base is not among its sources"):
        _merge(text)
