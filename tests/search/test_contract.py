"""The ask/tell contract, checked for every registered algorithm (STYLE.md, "Tests").

Every algorithm module is imported so the registry is full; each algorithm is built from
its default options and a small context (no model files are read), then: ``ask`` gives
JSON-able recipe dicts, asking twice is an error, ``tell`` accepts per-example scores,
``state_dict`` is JSON-able and a restored copy asks exactly what the original asks, and
two instances with the same seed ask the same recipes.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from shoal.errors import StateError
from shoal.search.algorithms.base import ALGORITHMS, Algorithm, SearchContext, store_key
from shoal.search.context import import_algorithms

import_algorithms()
NAMES = sorted(n for n in ALGORITHMS if not n.startswith("toy-"))

LAYERS = 2
TENSORS = {
    "model.embed_tokens.weight": 64,
    **{f"model.layers.{i}.mlp.up_proj.weight": 32 for i in range(LAYERS)},
    **{f"model.layers.{i}.self_attn.q_proj.weight": 16 for i in range(LAYERS)},
    "model.norm.weight": 8,
    "lm_head.weight": 64,
}
TASKS = {"t1": 5, "t2": 3}

#: options an algorithm needs beyond its defaults to run on the small context
OPTIONS: dict[str, dict[str, Any]] = {"cycleqd": {"experts": {"t1": "a", "t2": "b"}}}


def _context(seed: int = 3) -> SearchContext:
    return SearchContext(
        models={"base": "/m/base", "a": "/m/a", "b": "/m/b"},
        base_model="base",
        num_layers=dict.fromkeys(("base", "a", "b"), LAYERS),
        tensors=dict(TENSORS),
        seed=seed,
        task_names=tuple(TASKS),
        task_sizes=dict(TASKS),
    )


def _make(name: str, seed: int = 3) -> Algorithm:
    return ALGORITHMS[name].from_config(dict(OPTIONS.get(name, {})), _context(seed))


def _scores(n: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    return [{t: (rng.random(k) < 0.5).astype(float) for t, k in TASKS.items()} for _ in range(n)]


def _drive(algo: Algorithm, batches: int, rng: np.random.Generator) -> None:
    for _ in range(batches):
        recipes = algo.ask(None)
        algo.tell(recipes, _scores(len(recipes), rng))


def test_registry_holds_the_published_algorithms():
    assert {"ps", "dfs", "m2n2"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_ask_gives_json_recipes_and_order_is_enforced(name):
    algo = _make(name)
    recipes = algo.ask(None)
    assert recipes and all(isinstance(r, dict) for r in recipes)
    json.dumps(recipes)
    with pytest.raises(StateError):
        algo.ask(None)
    with pytest.raises(StateError):
        algo.tell(recipes[:-1], _scores(len(recipes) - 1, np.random.default_rng(0)))
    algo.tell(recipes, _scores(len(recipes), np.random.default_rng(0)))
    assert algo.evaluations == len(recipes)
    with pytest.raises(StateError):
        algo.tell(recipes, _scores(len(recipes), np.random.default_rng(0)))


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trip_continues_identically(name):
    algo = _make(name)
    _drive(algo, 3, np.random.default_rng(1))
    state = json.loads(json.dumps(algo.state_dict()))  # plain data only
    copy = _make(name)
    copy.load_state_dict(state)
    assert copy.evaluations == algo.evaluations
    rng_a, rng_b = np.random.default_rng(2), np.random.default_rng(2)
    for _ in range(2):
        ra, rb = algo.ask(None), copy.ask(None)
        assert ra == rb
        algo.tell(ra, _scores(len(ra), rng_a))
        copy.tell(rb, _scores(len(rb), rng_b))
    assert (algo.best is None) == (copy.best is None)
    if algo.best is not None and copy.best is not None:
        assert algo.best.recipe == copy.best.recipe
        assert algo.best.fitness == pytest.approx(copy.best.fitness)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_recipes_and_best_after_tell(name):
    a, b = _make(name, seed=5), _make(name, seed=5)
    _drive(a, 2, np.random.default_rng(4))
    _drive(b, 2, np.random.default_rng(4))
    assert a.ask(None) == b.ask(None)
    assert a.best is not None and np.isfinite(a.best.fitness)
    assert isinstance(a.references(), set)
    if type(a).keep_models:
        assert all(isinstance(r, str) for r in a.references())


@pytest.mark.parametrize("name", NAMES)
def test_load_state_rejects_another_algorithm(name):
    algo = _make(name)
    state = algo.state_dict()
    state["algorithm"] = "something-else"
    with pytest.raises(StateError):
        _make(name).load_state_dict(state)


@pytest.mark.parametrize("name", NAMES)
def test_a_failed_batch_is_the_worst_and_kept_by_nobody(name):
    """The runner tells a failed candidate as NaN on every example: no algorithm makes it
    its best, names it among the models it still needs, or writes a NaN into its state."""
    rng = np.random.default_rng(4)
    algo = _make(name)
    _drive(algo, 2, rng)
    failed = algo.ask(None)
    algo.tell(failed, [{t: np.full(k, np.nan) for t, k in TASKS.items()} for _ in failed])
    _drive(algo, 2, rng)
    best = algo.best
    assert best is not None and np.isfinite(best.fitness) and best.recipe not in failed
    keys = {store_key(r) for r in failed}
    assert not keys & algo.references()
    json.dumps(algo.state_dict(), allow_nan=False)
