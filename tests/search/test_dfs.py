"""Data-flow-space evolutionary merge: slot layout, genome → path decoding, optimisation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shoal.errors import RecipeError
from shoal.merge.layer_path import parse_layer_path
from shoal.search.base import ALGORITHMS, SearchContext
from shoal.search.dfs import DFS

A3B3 = (["A", "B"], [3, 3])


def test_registered() -> None:
    assert ALGORITHMS["dfs"] is DFS


def test_layout_and_initial_genome_is_model_a() -> None:
    dfs = DFS(*A3B3, seed=0, options={"repeats": 2, "popsize": 8})
    # M = 6 layers; A's first and last are pinned, so 4 free layers a repetition
    assert dfs.slots == [(r, j) for r in range(2) for j in (1, 3, 4, 5)]
    assert dfs.es.n == 8 + 36  # T indicators + the M×M scaling matrix
    x0 = dfs.es.mean
    assert x0[0] == 2.0 and np.all(x0[1:8] == 0)  # A's layer 1 of repetition 0 at 2σ0
    assert np.all(x0[8:] == 1.0)  # W = 1
    path, scales = dfs.path_and_scales(x0)
    assert path == [("A", 0), ("A", 1), ("A", 2)] and scales == [1.0, 1.0, 1.0]


def test_decode_hand_made_genome() -> None:
    dfs = DFS(*A3B3, seed=0, options={"repeats": 2, "popsize": 8})
    x = np.full(8 + 36, -1.0)
    x[[2, 4, 6]] = 0.5  # slots (0, B1), (1, A1), (1, B1)
    w = 100 + np.arange(36, dtype=float).reshape(6, 6)  # W_ij = 100 + 6 i + j
    x[8:] = w.reshape(-1)
    recipe = dfs.decode(x)
    path = [["A", 0], ["B", 1], ["A", 1], ["B", 1], ["A", 2]]
    # global layer indices: A0=0, A1=1, A2=2, B0=3, B1=4, B2=5
    hops = [(0, 4), (4, 1), (1, 4), (4, 2)]
    assert recipe == {
        "merge_method": "layer_path",
        "models": [{"model": "A"}, {"model": "B"}],
        "parameters": {"path": path, "scales": [1.0] + [100 + 6 * i + j for i, j in hops]},
    }
    lp = parse_layer_path(recipe)  # the builder's validator accepts it
    assert lp.head == "A" and len(lp.path) == 5


def test_slot_and_no_scaling() -> None:
    slot = DFS(*A3B3, seed=0, options={"repeats": 1, "scaling": "slot", "popsize": 8})
    assert slot.es.n == 4 + 5
    x = np.array([1.0, -1.0, 1.0, -1.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    path, scales = slot.path_and_scales(x)
    assert path == [("A", 0), ("A", 1), ("B", 1), ("A", 2)]
    assert scales == [1.0, 0.1, 0.3, 0.5]
    none = DFS(*A3B3, seed=0, options={"repeats": 1, "scaling": "none", "popsize": 8})
    assert none.es.n == 4
    assert none.path_and_scales(x[:4])[1] == [1.0] * 4


def _score(recipe: dict) -> dict[str, np.ndarray]:
    """Rewards paths through B's layer 1 and scales near 1.2 on entering it; short is better."""
    path = [tuple(p) for p in recipe["parameters"]["path"]]
    scales = recipe["parameters"]["scales"]
    has_b1 = ("B", 1) in path
    s = [scales[h] for h, p in enumerate(path) if p == ("B", 1)]
    close = float(np.exp(-((np.mean(s) - 1.2) ** 2) * 20)) if s else 0.0
    return {"fit": np.array([float(has_b1), close, 1.0 / len(path)])}


def test_finds_a_planted_path() -> None:
    dfs = DFS(*A3B3, seed=3, options={"repeats": 2, "popsize": 16})
    for _ in range(25):
        recipes = dfs.ask()
        dfs.tell(recipes, [_score(r) for r in recipes])
    assert dfs.best is not None
    path = dfs.best.recipe["parameters"]["path"]
    assert ["B", 1] in path and len(path) <= 4
    assert dfs.best.extra["task_means"]["fit"] > (1 + 0.9 + 0.25) / 3


def test_state_round_trip_continues_identically() -> None:
    def run(resume: bool) -> list:
        dfs, seen = DFS(*A3B3, seed=9, options={"repeats": 2, "popsize": 10}), []
        for g in range(6):
            recipes = dfs.ask(4)
            seen += recipes
            dfs.tell(recipes, [_score(r) for r in recipes])
            if resume and g % 2 == 0:
                state = json.loads(json.dumps(dfs.state_dict()))
                dfs = DFS(*A3B3, seed=0, options={"repeats": 2, "popsize": 10})
                dfs.load_state_dict(state)
        return seen

    assert run(False) == run(True)


def test_from_config() -> None:
    ctx = SearchContext(
        models={"base": "/b", "A": "/a", "B": "/b2", "C": "/c"},
        base_model="base",
        num_layers={"base": 3, "A": 3, "B": 4, "C": None},
        seed=1,
    )
    dfs = DFS.from_config({"models": ["A", "B"], "repeats": 1, "popsize": 6}, ctx)
    assert dfs.models == ["A", "B"] and len(dfs.slots) == 1 + 4
    assert (
        dfs.ask() == DFS.from_config({"models": ["A", "B"], "repeats": 1, "popsize": 6}, ctx).ask()
    )
    with pytest.raises(RecipeError, match="'C'"):
        DFS.from_config({"models": ["A", "C"]}, ctx)
    with pytest.raises(RecipeError, match=r"algorithm\.repeats"):
        DFS.from_config({"models": ["A", "B"], "repeats": 0}, ctx)
    with pytest.raises(RecipeError, match=r"algorithm\.scale"):
        DFS.from_config({"scale": "matrix"}, ctx)
