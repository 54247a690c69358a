"""The PS search space takes its ``method`` from the registry: any method with a base and a
per-model weight or density (the genome), the DELLA methods of issue #14 included."""

from __future__ import annotations

import pytest

from shoal.errors import RecipeError
from shoal.recipe import METHODS, load_recipe
from shoal.search.algorithms.base import SearchContext
from shoal.search.algorithms.ps import PS

CONTEXT = SearchContext(
    models={"base": "/m/base", "x": "/m/x", "y": "/m/y"},
    base_model="base",
    num_layers={"base": 3, "x": 3, "y": 3},
    seed=3,
)


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_ps_searches_della(method: str) -> None:
    ps = PS.from_config(
        {"method": method, "groups": "per_layer", "parameters": {"epsilon": 0.1}}, CONTEXT
    )
    recipe = ps.ask()[0]
    assert recipe["merge_method"] == method
    loaded = load_recipe(recipe)  # every candidate is a valid recipe of that method
    assert loaded.merge_method == method and loaded.parameters == {"epsilon": 0.1}
    assert loaded.models is not None
    assert {"weight", "density"} <= set(loaded.models[0].parameters or {})


@pytest.mark.parametrize("method", ["multislerp", "nuslerp", "task_arithmetic"])
def test_ps_searches_the_weight_alone_where_there_is_no_density(method: str) -> None:
    """A weight-only method: the genome is one weight per model and group (half the
    numbers), every candidate a valid recipe with the base and only weights."""
    ps = PS.from_config({"method": method, "groups": "per_layer"}, CONTEXT)
    dare = PS.from_config({"groups": "per_layer"}, CONTEXT)
    assert ps.es.n * 2 == dare.es.n == 2 * 2 * 5  # 2 models x (embed, 3 blocks, rest)
    recipe = ps.ask()[0]
    loaded = load_recipe(recipe)
    assert loaded.merge_method == method and loaded.base_model == "base"
    assert all(set(m.parameters or {}) == {"weight"} for m in loaded.models or [])
    assert set(ps.describe(ps.es.mean)["x"]) == {"weight"}


def test_ps_names_the_methods_it_can_search() -> None:
    """A method whose recipe has no per-model weight or density (sce weighs its task
    vectors itself) has nothing for the genome to set: refused, with the ones that fit."""
    with pytest.raises(RecipeError, match=r"algorithm\.method: .*'sce' has no base and per-model"):
        PS.from_config({"method": "sce"}, CONTEXT)
    with pytest.raises(RecipeError, match=r"'dare' is no merge method .*della_linear"):
        PS.from_config({"method": "dare"}, CONTEXT)
    fits = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della"}
    assert fits | {"della_linear"} <= set(METHODS)
    for method in fits:
        assert PS.from_config({"method": method}, CONTEXT).ask()[0]["merge_method"] == method
