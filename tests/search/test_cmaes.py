"""The pycma wrapper: convergence, bounds, seeding, NaN handling, exact resume."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import pytest

from shoal.errors import StateError
from shoal.search.algorithms.cmaes import CMAES, GenomeCMAES, default_popsize

TARGET = np.array([0.1, 0.9, 0.3, 0.7, 0.5])


def sphere(x: np.ndarray) -> float:
    return -float(np.sum((x - TARGET) ** 2))


def _run(seed: int, gens: int, resume_at: int | None = None) -> CMAES:
    es = CMAES(np.full(5, 0.5), 1 / 6, seed=seed, bounds=(0, 1))
    for g in range(gens):
        if g == resume_at:
            state = json.loads(json.dumps(es.state_dict()))  # through JSON, as on disk
            es = CMAES(np.full(5, 0.5), 1 / 6, seed=12345, bounds=(0, 1))
            es.load_state_dict(state)
        xs = es.ask()
        es.tell(xs, [sphere(x) for x in xs])
    return es


def test_default_popsize_formula() -> None:
    # 4 + floor(3 ln n): ln 2 = 0.69 -> 2; ln 6 = 1.79 -> 5; ln 48 = 3.87 -> 11
    assert [default_popsize(n) for n in (1, 2, 6, 48)] == [4, 6, 9, 15]
    assert CMAES(np.zeros(6), 1.0, seed=0).popsize == 9


def test_converges_on_bounded_sphere() -> None:
    es = _run(seed=1, gens=60)
    assert es.best_fitness > -1e-4
    assert np.allclose(es.mean, TARGET, atol=0.02)
    assert es.evaluations == 60 * es.popsize and es.generation == 60


def test_asked_points_respect_bounds() -> None:
    es = CMAES(np.full(3, 0.5), 2.0, seed=0, bounds=([0, -1, None], [1, 1, None]))
    for _ in range(5):
        xs = es.ask()
        assert (xs[:, 0] >= 0).all() and (xs[:, 0] <= 1).all()
        assert (xs[:, 1] >= -1).all() and (xs[:, 1] <= 1).all()
        es.tell(xs, [-abs(x[2] - 3) for x in xs])


def test_seed_determines_run_and_global_rng_is_untouched() -> None:
    np.random.seed(0)
    before = np.random.get_state()[1].copy()  # type: ignore[index]
    a = _run(seed=7, gens=10)
    assert np.array_equal(np.random.get_state()[1], before)  # type: ignore[index]
    np.random.seed(99)  # a different global state changes nothing
    b = _run(seed=7, gens=10)
    c = _run(seed=8, gens=10)
    assert np.array_equal(a.mean, b.mean) and a.best_fitness == b.best_fitness
    assert not np.array_equal(a.mean, c.mean)


def test_state_round_trip_mid_run_continues_identically() -> None:
    straight = _run(seed=3, gens=25)
    resumed = _run(seed=3, gens=25, resume_at=11)
    assert np.array_equal(straight.mean, resumed.mean)
    assert straight.sigma == resumed.sigma
    assert np.array_equal(straight.best_x, resumed.best_x)


def test_nan_counts_as_worst() -> None:
    # a NaN ranked worst gives the same update as an explicit worst value
    def run(bad: float) -> np.ndarray:
        es = CMAES(np.zeros(4), 1.0, seed=5)
        for _ in range(4):
            xs = es.ask()
            f = [-float(np.sum(x**2)) for x in xs]
            f[0] = bad
            es.tell(xs, f)
        return es.mean

    assert np.array_equal(run(float("nan")), run(-1e9))
    assert np.array_equal(run(float("inf")), run(-1e9))


def test_a_generation_that_fails_whole_leaves_the_best_as_it_was() -> None:
    es = CMAES(np.zeros(3), 1.0, seed=2)
    xs = es.ask()
    es.tell(xs, [-10.0 - i for i in range(len(xs))])
    assert es.best_fitness == -10.0 and np.array_equal(es.best_x, xs[0])
    es.tell(es.ask(), [float("nan")] * es.popsize)  # every candidate failed
    assert es.best_fitness == -10.0 and np.array_equal(es.best_x, xs[0])


def test_load_state_rejects_other_dimension() -> None:
    state = CMAES(np.zeros(3), 1.0, seed=0).state_dict()
    with pytest.raises(StateError, match="3 dimensions"):
        CMAES(np.zeros(4), 1.0, seed=0).load_state_dict(state)


class _Toy(GenomeCMAES):
    """Recipes {'x': [...]}, scored by the caller."""

    name = "toy-genome"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.es = CMAES(np.full(3, 0.5), 0.2, seed=seed, popsize=8, bounds=(0, 1))

    def decode(self, x: np.ndarray) -> dict[str, Any]:
        return {"x": [float(v) for v in x]}


def _score(recipe: dict[str, Any]) -> dict[str, np.ndarray]:
    x = np.asarray(recipe["x"])
    per_example = 1.0 - (x - np.array([0.2, 0.8, 0.4])) ** 2  # three "examples" in [0, 1]
    return {"t": per_example}


def _drive(chunk: int | None, evals: int, resume_every: bool = False) -> tuple[_Toy, list]:
    algo, seen = _Toy(seed=4), []
    while algo.evaluations < evals:
        recipes = algo.ask(chunk)
        seen += recipes
        algo.tell(recipes, [_score(r) for r in recipes])
        if resume_every:
            state = json.loads(json.dumps(algo.state_dict()))
            algo = _Toy(seed=0)
            algo.load_state_dict(state)
    return algo, seen


def test_genome_algorithm_chunked_asks_equal_whole_generations() -> None:
    whole, seen_whole = _drive(None, 48)
    chunked, seen_chunked = _drive(3, 48)
    resumed, seen_resumed = _drive(3, 48, resume_every=True)
    assert seen_whole == seen_chunked == seen_resumed
    assert len(seen_whole) == 48
    assert whole.best is not None and resumed.best is not None
    assert whole.best == chunked.best == resumed.best
    # best is the argmax of the mean score over what was seen
    means = [float(np.mean(_score(r)["t"])) for r in seen_whole]
    assert whole.best.fitness == max(means)
    assert whole.best.evaluation == int(np.argmax(means))


def test_genome_algorithm_failed_scores_are_worst() -> None:
    algo = _Toy()
    recipes = algo.ask()
    scores = [_score(r) for r in recipes]
    scores[0] = {}  # a failed evaluation: no scores at all
    algo.tell(recipes, scores)
    assert algo.best is not None and math.isfinite(algo.best.fitness)
    assert algo.best.recipe != recipes[0]
    with pytest.raises(StateError):
        algo.tell(recipes, scores)


def test_tied_generations_do_not_end_the_search_early() -> None:
    """Exact-match fitness on few items ties often; that is no convergence (pycma's tolfun)."""
    es = CMAES([0.5] * 4, 1 / 6, seed=0, bounds=(0, 1))
    for _ in range(5):
        xs = es.ask()
        es.tell(xs, [0.25] * len(xs))
        assert es.stop() == []
    stops = []
    for _ in range(16):  # but a long flat stretch does end it (tolflatfitness), as the run
        es.tell(es.ask(), [0.25] * es.popsize)  # loop asks after every generation
        stops.append(es.stop())
    assert stops[-2] == [] and stops[-1] == ["tolflatfitness"]  # after 20 + 1 generations


def test_cma_options_take_pycma_spellings_and_refuse_unknown_keys() -> None:
    """pycma reads any case and unique prefixes of its option names."""
    es = CMAES([0.5, 0.5], 0.2, seed=0, options={"cma_diagonal": True, "MaxIter": 3})
    assert es._es.opts["CMA_diagonal"] is True and es._es.opts["maxiter"] == 3
    with pytest.raises(ValueError, match=r"unknown pycma option\(s\) bogus"):
        CMAES([0.5, 0.5], 0.2, seed=0, options={"bogus": 1})


_RESUME_SCRIPT = """
import json, sys
import numpy as np
from shoal.search.algorithms.cmaes import CMAES

def f(xs):
    return [-float(np.sum((x - 0.3) ** 2)) for x in xs]

mode, path, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if options:  # integer variables: rounding makes equal vectors, filed under one key
    es = CMAES(np.full(2, 0.5), 0.4, seed=3, popsize=12, options=options)
    for _ in range(3):
        xs = es.ask()
        es.tell(xs, f(xs))
else:
    es = CMAES(np.full(4, 0.5), 0.3, seed=0, bounds=(0.0, 1.0))
if mode == "whole":
    xs = es.ask()
    es.tell(xs, f(xs))
    print(json.dumps(es.ask().tolist()))
elif mode == "save":
    xs = es.ask()
    json.dump({"state": es.state_dict(), "xs": xs.tolist()}, open(path, "w"))
else:
    saved = json.load(open(path))
    es.load_state_dict(saved["state"])
    xs = np.array(saved["xs"])
    es.tell(xs, f(xs))
    print(json.dumps(es.ask().tolist()))
"""


@pytest.mark.parametrize("options", [{}, {"integer_variables": [0, 1]}])
def test_a_generation_asked_before_a_kill_is_told_alike_in_a_new_process(tmp_path, options):
    """pycma files asked solutions under Python's per-process ``hash``: a state saved
    between ask and tell and loaded by another process (another PYTHONHASHSEED, as a
    resumed run has) must continue exactly as the uninterrupted process does."""
    import subprocess
    import sys

    script = tmp_path / "resume.py"
    script.write_text(_RESUME_SCRIPT)
    state = tmp_path / "state.json"

    def run(mode: str, hash_seed: str) -> str:
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, str(script), mode, str(state), json.dumps(options)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    whole = run("whole", "1")
    run("save", "1")
    assert run("load", "2") == whole
