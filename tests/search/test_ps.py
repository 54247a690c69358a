"""Parameter-space evolutionary merge: genome ↔ recipe, bounds, optimisation, config."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from shoal.errors import RecipeError
from shoal.recipe import load_recipe
from shoal.recipe.params import resolve
from shoal.search.algorithms.base import ALGORITHMS, SearchContext
from shoal.search.algorithms.ps import PS


def test_registered() -> None:
    assert ALGORITHMS["ps"] is PS


def test_per_model_genome_and_recipe() -> None:
    ps = PS(["a", "b", "c"], "base", seed=0)
    assert ps.es.n == 6  # the published 7B setting: 2 numbers a model
    assert ps.popsize == 4 + math.floor(3 * math.log(6))
    x = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])  # (w_a, d_a, w_b, d_b, w_c, d_c)
    recipe = ps.decode(x)
    assert recipe == {
        "merge_method": "dare_ties",
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": 0.1, "density": 0.2}},
            {"model": "b", "parameters": {"weight": 0.3, "density": 0.4}},
            {"model": "c", "parameters": {"weight": 0.5, "density": 0.6}},
        ],
    }
    parsed = load_recipe(recipe)  # the merge layer's own schema accepts it
    assert parsed.merge_method == "dare_ties"


def test_first_generation_is_centred_on_x0_within_bounds() -> None:
    ps = PS(["a", "b"], "base", seed=1, options={"popsize": 200})
    recipes = ps.ask()
    vals = np.array(
        [[m["parameters"][k] for m in r["models"] for k in ("weight", "density")] for r in recipes]
    )
    assert ((vals >= 0) & (vals <= 1)).all()
    assert np.allclose(vals.mean(axis=0), 0.5, atol=0.04)  # x0 = 0.5
    assert np.allclose(vals.std(axis=0), 1 / 6, atol=0.03)  # sigma0 = 1/6


def test_per_layer_groups_resolve_per_tensor() -> None:
    ps = PS(["a", "b"], "base", seed=0, options={"groups": "per_layer"}, num_layers=12)
    groups = 12 + 2  # embeddings, 12 blocks, the rest
    assert ps.es.n == 2 * 2 * groups
    x = np.arange(ps.es.n) / 100.0
    recipe = ps.decode(x)
    load_recipe(recipe)
    w_b = recipe["models"][1]["parameters"]["weight"]
    d_b = recipe["models"][1]["parameters"]["density"]
    off = 2 * groups  # model b's slice of the genome: weights then densities
    cases = {
        "model.embed_tokens.weight": 0,
        "model.layers.0.self_attn.q_proj.weight": 1,
        "model.layers.1.mlp.up_proj.weight": 2,
        "model.layers.10.mlp.up_proj.weight": 11,
        "model.layers.11.input_layernorm.weight": 12,
        "model.norm.weight": 13,
        "lm_head.weight": 13,
    }
    for name, g in cases.items():
        assert resolve(w_b, name, None, None) == pytest.approx(x[off + g]), name
        assert resolve(d_b, name, None, None) == pytest.approx(x[off + groups + g]), name
    assert ps.describe(x)["a"]["weight"]["layer3"] == pytest.approx(x[4])


def _toy_scores(recipe: dict, target: dict[str, tuple[float, float]]) -> dict[str, np.ndarray]:
    """Per-example scores peaking at a target (weight, density) per model."""
    out = []
    for m in recipe["models"]:
        w, d = m["parameters"]["weight"], m["parameters"]["density"]
        tw, td = target[m["model"]]
        out += [1 - (w - tw) ** 2, 1 - (d - td) ** 2]
    return {"fit": np.array(out)}


def test_finds_a_planted_optimum() -> None:
    target = {"a": (0.9, 0.3), "b": (0.6, 0.8)}
    ps = PS(["a", "b"], "base", seed=2)
    for _ in range(40):
        recipes = ps.ask()
        ps.tell(recipes, [_toy_scores(r, target) for r in recipes])
    assert ps.best is not None
    genome = ps.best.extra["genome"]
    assert genome["a"]["weight"]["all"] == pytest.approx(0.9, abs=0.03)
    assert genome["b"]["density"]["all"] == pytest.approx(0.8, abs=0.03)
    assert ps.best.fitness > 0.999


def test_state_round_trip_continues_identically() -> None:
    target = {"a": (0.2, 0.7), "b": (0.4, 0.1)}

    def run(resume: bool) -> list:
        ps, seen = PS(["a", "b"], "base", seed=5), []
        for g in range(8):
            recipes = ps.ask(4)
            seen += recipes
            ps.tell(recipes, [_toy_scores(r, target) for r in recipes])
            if resume and g % 3 == 1:
                state = json.loads(json.dumps(ps.state_dict()))
                ps = PS(["a", "b"], "base", seed=999)
                ps.load_state_dict(state)
        return seen

    assert run(False) == run(True)


def test_from_config_uses_the_context() -> None:
    ctx = SearchContext(
        models={"base": "/m/base", "x": "/m/x", "y": "/m/y"},
        base_model="base",
        num_layers={"base": 3, "x": 3, "y": 3},
        seed=11,
    )
    ps = PS.from_config({"groups": "per_layer", "method": "ties"}, ctx)
    assert isinstance(ps, PS) and ps.models == ["x", "y"] and ps.es.n == 2 * 2 * 5
    recipe = ps.ask()[0]
    assert recipe["merge_method"] == "ties" and recipe["base_model"] == "base"
    assert PS.from_config({}, ctx).ask() == PS.from_config({}, ctx).ask()  # seeded


def test_config_errors_name_the_key() -> None:
    ctx = SearchContext(models={"base": "b", "x": "x"}, base_model="base")
    with pytest.raises(RecipeError, match=r"algorithm\.grups"):
        PS.from_config({"grups": "per_layer"}, ctx)
    with pytest.raises(RecipeError, match=r"algorithm\.groups"):
        PS.from_config({"groups": "per_block"}, ctx)
    with pytest.raises(RecipeError, match="base_model"):
        PS.from_config({}, SearchContext(models={"x": "x"}))
    with pytest.raises(RecipeError, match="per_layer"):
        PS.from_config({"groups": "per_layer"}, ctx)  # no layer count known


def test_per_layer_recipe_merges_each_block_with_its_own_weight() -> None:
    """Through shoal.merge: one expert, density 1 → each tensor is base + w_group · τ."""
    import torch

    from shoal.merge import merge_state_dicts

    g = torch.Generator().manual_seed(0)
    names = [
        "model.embed_tokens.weight",
        *(f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)),
        "model.norm.weight",
    ]
    base = {n: torch.randn(4, 3, generator=g) for n in names}
    expert = {n: t + torch.randn(4, 3, generator=g) for n, t in base.items()}
    ps = PS(["expert"], "base", options={"groups": "per_layer"}, num_layers=3)
    weights = np.array([0.1, 0.2, 0.3, 0.4, 0.5])  # embed, layer 0..2, rest
    x = np.concatenate([weights, np.ones(5)])  # densities 1: DARE keeps everything
    merged = merge_state_dicts(ps.decode(x), {"base": base, "expert": expert}, seed=0)
    for name, w in zip(names, weights, strict=True):
        expected = base[name] + w * (expert[name] - base[name])
        torch.testing.assert_close(merged[name], expected, msg=name)
