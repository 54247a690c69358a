"""CycleQD's archive and maths on hand-computed cases, and its state machine on toy scores."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from shoal.errors import RecipeError, StateError, TaskError
from shoal.search.algorithms.base import SearchContext, store_key
from shoal.search.algorithms.cycleqd import (
    CycleQD,
    aggregation_weights,
    crossover_weights,
    default_ranges,
    elite_weights,
    sample_parents,
)
from shoal.search.algorithms.qd_archive import AddStatus, GridArchive

# -- the archive ---------------------------------------------------------------------------------


def test_binning_edges_and_clipping():
    a = GridArchive(4, [(0.0, 1.0)])  # bins [0, .25) [.25, .5) [.5, .75) [.75, 1]
    assert [a.index_of([x])[0] for x in (0.0, 0.2499, 0.25, 0.5, 0.7499, 0.75, 1.0)] == [
        0,
        0,
        1,
        2,
        2,
        3,
        3,
    ]
    assert a.index_of([-5.0]) == (0,) and a.index_of([7.0]) == (3,)  # clipped to the edges
    assert a.index_of([float("nan")]) == (0,)
    b = GridArchive(2, [(-1.0, 1.0), (10.0, 20.0)])
    assert b.index_of([0.0, 14.99]) == (1, 0) and b.cells == 4


def test_insertion_rules_and_stats():
    a = GridArchive(4, [(0.0, 1.0)])
    assert a.add_one(0.5, [0.1], {"id": 1}) is AddStatus.NEW
    assert a.add_one(0.4, [0.2], {"id": 2}) is AddStatus.NOT_ADDED  # worse, same cell
    assert a.add_one(0.5, [0.0], {"id": 3}) is AddStatus.NOT_ADDED  # equal is not better
    assert a.add_one(0.6, [0.24], {"id": 4}) is AddStatus.IMPROVE
    assert a.add([0.1, 0.2], [[0.9], [0.95]], [{"id": 5}, {"id": 6}]) == [
        AddStatus.NEW,
        AddStatus.IMPROVE,  # the second competes with the first
    ]
    cell0 = a.get((0,))
    assert cell0 is not None and cell0.data == {"id": 4} and cell0.behaviour == (0.24,)
    s = a.stats()
    assert s.num_elites == 2 and s.coverage == 0.5
    assert s.qd_score == pytest.approx(0.8) and s.best_quality == 0.6
    assert s.mean_quality == pytest.approx(0.4)
    back = GridArchive.from_state_dict(json.loads(json.dumps(a.state_dict())))
    assert list(back) == list(a)


@pytest.mark.parametrize("ranges", [[(1.0, 1.0)], [(2.0, 1.0)], [(0.0, math.inf)]])
def test_an_empty_or_inverted_range_is_refused(ranges):
    with pytest.raises(ValueError, match="empty or inverted"):
        GridArchive(3, ranges)
    with pytest.raises(ValueError):
        GridArchive(0, [(0.0, 1.0)])


def test_default_ranges_scale_the_weakest_and_strongest_expert():
    means = np.array([[0.9, 0.2, 0.0], [0.1, 0.8, 0.0]])  # experts × tasks
    got = default_ranges(means)
    assert got[0] == pytest.approx((0.085, 1.035)) and got[1] == pytest.approx((0.17, 0.92))
    assert got[2] == (0.0, 1.0)  # every expert scores 0: a degenerate range is widened


# -- the maths -----------------------------------------------------------------------------------


def test_elite_weights_against_the_formula():
    cols = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    # paper: a_low + norm · 0.3 per coordinate, multiplied
    assert elite_weights(cols, 0.5, 0.8) == pytest.approx([0.8 * 0.5, 0.5 * 0.8, 0.65 * 0.65])
    # reference code: [0.5, 1.3]
    assert elite_weights(cols, 0.5, 1.3) == pytest.approx([1.3 * 0.5, 0.5 * 1.3, 0.9 * 0.9])
    # min-max normalisation: shifting and scaling a column changes nothing
    assert elite_weights(cols * [3.0, 1.0] + [2.0, 0.0]) == pytest.approx(elite_weights(cols))
    # a constant column weighs every elite alike
    assert elite_weights(np.array([[0.7], [0.7]])) == pytest.approx([0.5, 0.5])


def test_parent_sampling_frequencies_match_the_formula():
    w = np.array([0.4, 0.4, 0.4225, 0.1])
    p = w / w.sum()
    rng = np.random.default_rng(0)
    n = 40_000
    counts = np.zeros((4, 4))
    for _ in range(n):
        a, b = sample_parents(w, rng)
        counts[a, b] += 1
    want = p[:, None] * p[None, :] / (1 - p[:, None])  # first ∝ w, second ∝ w among the rest
    np.fill_diagonal(want, 0.0)
    assert np.diag(counts).sum() == 0  # two distinct parents
    assert np.abs(counts / n - want).max() < 0.01
    assert sample_parents(np.array([2.0]), rng) == (0, 0)  # one elite: itself twice


def test_crossover_and_aggregation_weights():
    assert crossover_weights(np.array([1.01, 0.99])) == pytest.approx([0.505, 0.495])
    beta = aggregation_weights(np.array([0.0, math.log(2.0)]))
    assert beta == pytest.approx([1 / 3, 2 / 3])
    assert aggregation_weights(np.array([0.0, math.log(2.0)]), 0.5) == pytest.approx([0.2, 0.8])


# -- the algorithm on toy scores -----------------------------------------------------------------

TASKS = ("t0", "t1", "t2")
EXPERTS = {"t0": "e0", "t1": "e1", "t2": "e2"}


def _context(seed: int = 0) -> SearchContext:
    return SearchContext(
        models={"base": "/b", "e0": "/0", "e1": "/1", "e2": "/2", "ps": "/ps"},
        base_model="base",
        seed=seed,
        task_names=TASKS,
        task_sizes=dict.fromkeys(TASKS, 4),
    )


def _make(**options) -> CycleQD:
    opts = {"experts": EXPERTS, "bins": 3, **options}
    algo = CycleQD.from_config(opts, _context())
    assert isinstance(algo, CycleQD)
    return algo


def _toy_scores(recipe: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if "merge_method" not in recipe:  # expert i: 1.0 on its task, 0.25 elsewhere
        i = int(recipe["model"][1])
        return {t: np.full(4, 1.0 if k == i else 0.25) for k, t in enumerate(TASKS)}
    return {t: (rng.random(4) < 0.5).astype(float) for t in TASKS}


def _drive(algo: CycleQD, asks: int, rng: np.random.Generator) -> list[list[dict]]:
    out = []
    for _ in range(asks):
        recipes = algo.ask(None)
        algo.tell(recipes, [_toy_scores(r, rng) for r in recipes])
        out.append(recipes)
    return out


def test_seeds_fill_every_archive_with_ranges_from_the_experts():
    algo = _make()
    seeds = algo.ask(None)
    assert seeds == [{"model": "e0"}, {"model": "e1"}, {"model": "e2"}]
    algo.tell(seeds, [_toy_scores(r, np.random.default_rng(0)) for r in seeds])
    assert algo.archives is not None
    # behaviour ranges: [0.85 × 0.25, 1.15 × 1.0] on every task, 3 bins: e_k is in the top
    # bin of axis k and the bottom bin of the others
    assert algo.archives[0].ranges == [pytest.approx((0.2125, 1.15))] * 2
    assert algo.last_status == [[2, 2, 2], [2, 2, 2], [2, 2, 2]]  # NEW everywhere
    cell = algo.archives[0].get((2, 0))
    assert cell is not None and cell.data["ref"] == "e1" and cell.quality == 0.25


def test_further_seeds_follow_the_experts_and_leave_the_ranges_alone():
    algo = _make(seeds=["ps"])
    seeds = algo.ask(2)
    assert seeds == [{"model": "e0"}, {"model": "e1"}]
    algo.tell(seeds, [_toy_scores(r, np.random.default_rng(0)) for r in seeds])
    rest = algo.ask(None)
    assert rest == [{"model": "e2"}, {"model": "ps"}] and algo.archives is None
    # ps: 0.1 on t0, below every expert (so it would move t0's range if it counted), 0.9 else
    ps = {"t0": np.full(4, 0.1), "t1": np.full(4, 0.9), "t2": np.full(4, 0.9)}
    algo.tell(rest, [_toy_scores(rest[0], np.random.default_rng(0)), ps])
    assert algo.archives is not None
    # ranges from the experts alone: [0.85 × 0.25, 1.15 × 1.0] on every axis
    for archive in algo.archives:
        assert archive.ranges == [pytest.approx((0.2125, 1.15))] * 2
    # archive 0 (axes t1, t2): cell (2, 2) was empty; archives 1 and 2: t0 = 0.1 clips to
    # bin 0, and ps (0.9) beats the expert there (0.25 on that archive's task)
    assert algo.last_status[-1] == [AddStatus.NEW, AddStatus.IMPROVE, AddStatus.IMPROVE]
    for archive, cell in zip(algo.archives, [(2, 2), (0, 2), (0, 2)], strict=True):
        elite = archive.get(cell)
        assert elite is not None and elite.data["ref"] == "ps"
    assert algo.ask(None)[0]["merge_method"] == "task_arithmetic"  # then the children


def test_quality_task_cycles_every_generation():
    algo = _make(children=2)
    asks = _drive(algo, 8, np.random.default_rng(1))
    experts = [[r["svd_mutation"]["expert"] for r in batch] for batch in asks[1:]]
    assert experts == [[f"e{g % 3}"] * 2 for g in range(7)]  # e0, e1, e2, e0, ...
    assert algo.q == 7 % 3 and algo.generation == 7


def test_without_cycling_the_first_task_stays_the_quality():
    algo = _make(children=2, cycling=False)
    asks = _drive(algo, 5, np.random.default_rng(1))
    experts = [[r["svd_mutation"]["expert"] for r in batch] for batch in asks[1:]]
    assert experts == [["e0"] * 2] * 4 and algo.q == 0 and algo.generation == 4


def test_specialists_are_the_best_elite_of_each_archive():
    algo = _make(children=2)
    _drive(algo, 6, np.random.default_rng(3))
    assert algo.archives is not None
    specialists = algo.specialists()
    assert list(specialists) == ["best-t0", "best-t1", "best-t2"]
    for k, archive in enumerate(algo.archives):
        top = max(e.quality for _, e in archive)
        sp = specialists[f"best-t{k}"]
        assert sp.fitness == top
        # the same model as the archive's best cell: its mean on task k is that quality
        holder = next(e for _, e in archive if e.data["evaluation"] == sp.evaluation)
        assert holder.quality == top and holder.data["recipe"] == sp.recipe


def test_parents_come_from_the_quality_archive_and_children_go_everywhere():
    algo = _make(sampling="uniform")
    rng = np.random.default_rng(2)
    _drive(algo, 4, rng)
    assert algo.archives is not None
    q = algo.q
    members = {e.data["ref"] for _, e in algo.archives[q]}
    (child,) = algo.ask(None)
    parents = {m["model"] for m in child["models"]}
    assert parents <= members
    assert child["base_model"] == "base" and child["parameters"] == {
        "lambda": 1.0,
        "normalize": False,
    }
    assert sum(m["parameters"]["weight"] for m in child["models"]) == pytest.approx(1.0)
    scores = {"t0": np.ones(4), "t1": np.ones(4), "t2": np.ones(4)}  # the best possible
    algo.tell([child], [scores])
    assert all(s in (AddStatus.NEW, AddStatus.IMPROVE) for s in algo.last_status[0])
    ref = "store:" + store_key(child)
    assert all(
        any(e.data["ref"] == ref for _, e in a) for a in algo.archives
    )  # in every archive it improves
    assert store_key(child) in algo.references()
    assert algo.best is not None and algo.best.recipe == child and algo.best.fitness == 1.0


def test_gaussian_and_no_mutation_ablations():
    g = _make(mutation="gaussian")
    _drive(g, 1, np.random.default_rng(0))
    (child,) = g.ask(None)
    assert child["mutation"] == 0.0003 and "svd_mutation" not in child
    n = _make(mutation="none", omega_std=0.0)
    _drive(n, 1, np.random.default_rng(0))
    (child,) = n.ask(None)
    assert "mutation" not in child and "svd_mutation" not in child
    assert [m["parameters"]["weight"] for m in child["models"]] == [0.5, 0.5]


def test_the_aggregate_is_asked_last_and_becomes_best():
    algo = _make(generations=3, aggregate="all_elites", temperature=0.5)
    _drive(algo, 4, np.random.default_rng(3))
    assert algo.stop() == []
    assert algo.archives is not None
    elites = [(e.data["ref"], e.quality) for a in algo.archives for _, e in a]
    (agg,) = algo.ask(None)
    beta = aggregation_weights(np.array([q for _, q in elites]), 0.5)
    want: dict[str, float] = {}
    for (ref, _), b in zip(elites, beta, strict=True):
        want[ref] = want.get(ref, 0.0) + b
    got = {m["model"]: m["parameters"]["weight"] for m in agg["models"]}
    assert got == pytest.approx(want) and sum(got.values()) == pytest.approx(1.0)
    algo.tell([agg], [{t: np.full(4, 0.5) for t in TASKS}])
    assert algo.best is not None and algo.best.recipe == agg and algo.best.fitness == 0.5
    assert algo.stop() == ["3 generations done"]
    with pytest.raises(StateError, match="finished"):
        algo.ask(None)


def test_best_per_task_aggregates_one_elite_per_archive():
    algo = _make(generations=0, aggregate="best_per_task")
    _drive(algo, 1, np.random.default_rng(0))
    (agg,) = algo.ask(None)
    # each expert is the best of its own archive, quality 1.0: β = 1/3 each
    assert {m["model"]: m["parameters"]["weight"] for m in agg["models"]} == pytest.approx(
        {"e0": 1 / 3, "e1": 1 / 3, "e2": 1 / 3}
    )


def test_state_round_trip_mid_run_continues_identically():
    a = _make(children=3)
    _drive(a, 5, np.random.default_rng(4))
    b = _make(children=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    ra, rb = _drive(a, 4, np.random.default_rng(5)), _drive(b, 4, np.random.default_rng(5))
    assert ra == rb and a.state_dict() == b.state_dict()
    other = _make(children=2)
    with pytest.raises(StateError, match="other options"):
        other.load_state_dict(a.state_dict())


def test_a_state_saved_midway_through_the_seeds_continues_identically():
    a = _make(seeds=["ps"], children=2)
    rng = np.random.default_rng(6)
    first = a.ask(1)  # one seed told, three still to ask: no archive yet
    a.tell(first, [_toy_scores(first[0], rng)])
    b = _make(seeds=["ps"], children=2)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.archives is None and b.ask(None) == a.ask(None) == [
        {"model": m} for m in ("e1", "e2", "ps")
    ]
    # a seed that failed (the runner tells NaN) is kept as failed and enters no archive
    scores = [_toy_scores({"model": "e1"}, rng), _toy_scores({"model": "e2"}, rng)]
    scores.append({t: np.full(4, np.nan) for t in TASKS})
    for algo in (a, b):
        algo.tell([{"model": m} for m in ("e1", "e2", "ps")], [dict(s) for s in scores])
    assert a._seed_means[-1] is None and a.state_dict() == b.state_dict()
    assert a.last_status[-1] == [0, 0, 0]
    assert "ps" not in {e.data["ref"] for arch in a.archives for _, e in arch}
    ra, rb = _drive(a, 3, np.random.default_rng(7)), _drive(b, 3, np.random.default_rng(7))
    assert ra == rb and a.state_dict() == b.state_dict()


def test_a_state_saved_before_seeds_existed_still_loads():
    a = _make(children=2)
    _drive(a, 3, np.random.default_rng(8))
    old = json.loads(json.dumps(a.state_dict()))
    del old["state"]["options"]["seeds"]  # what a run of the previous version saved
    b = _make(children=2)
    b.load_state_dict(old)
    ra, rb = _drive(a, 2, np.random.default_rng(9)), _drive(b, 2, np.random.default_rng(9))
    assert ra == rb
    with pytest.raises(StateError, match="other options"):  # unless it is given seeds now
        _make(children=2, seeds=["ps"]).load_state_dict(old)


@pytest.mark.parametrize(
    ("options", "context_base", "needle"),
    [
        ({"experts": {"t0": "e0"}, "tasks": ["t0"]}, "base", "algorithm.tasks: cycleqd needs"),
        ({"experts": {"t0": "e0", "t1": "e1"}}, "base", "algorithm.experts: task 't2' has no"),
        ({"experts": {**EXPERTS, "t1": "nope"}}, "base", "algorithm.experts.t1: unknown model"),
        ({"experts": EXPERTS, "bins": 0}, "base", "algorithm.bins:"),
        ({"experts": EXPERTS, "ranges": {"t1": [0.9, 0.1]}}, "base", "algorithm.ranges.t1:"),
        ({"experts": EXPERTS, "range_scale": [1.2, 0.8]}, "base", "algorithm.range_scale:"),
        ({}, "base", "algorithm.experts: Field required"),
        ({"experts": EXPERTS}, None, "base_model:"),
        ({"experts": EXPERTS, "seeds": ["nope"]}, "base", "algorithm.seeds: unknown model"),
        ({"experts": EXPERTS, "seeds": ["e1"]}, "base", "algorithm.seeds: 'e1' (entry 0) is al"),
        ({"experts": EXPERTS, "seeds": ["ps", "ps"]}, "base", "algorithm.seeds: 'ps' (entry 1)"),
    ],
)
def test_bad_options_are_one_line_naming_the_key(options, context_base, needle):
    ctx = _context()
    ctx = SearchContext(**{**vars(ctx), "base_model": context_base})
    with pytest.raises(RecipeError) as exc:
        CycleQD.from_config(options, ctx)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def _failed(recipes: list[dict]) -> list[dict[str, np.ndarray]]:
    """What the runner tells for candidates that failed to build or score."""
    return [{t: np.full(4, np.nan) for t in TASKS} for _ in recipes]


def test_a_failed_child_enters_no_archive_even_an_empty_cell():
    # ranges [0.3, 1.0], 3 bins: the experts (0.6 off their task) sit in cell (1, 1) of
    # every archive, and cell (0, 0) — where a failure scored 0 used to clip — is empty
    algo = _make(children=2, ranges=dict.fromkeys(TASKS, (0.3, 1.0)))
    seeds = algo.ask(None)
    algo.tell(
        seeds,
        [{t: np.full(4, 1.0 if t[1] == r["model"][1] else 0.6) for t in TASKS} for r in seeds],
    )
    assert all(a.get((1, 1)) is not None and a.get((0, 0)) is None for a in algo.archives)
    before = [a.state_dict() for a in algo.archives]
    refs, best = algo.references(), algo.best
    children = algo.ask(None)
    algo.tell(children, _failed(children))
    assert algo.last_status == [[0, 0, 0], [0, 0, 0]]
    assert [a.state_dict() for a in algo.archives] == before
    assert algo.references() == refs and algo.best == best
    assert algo.generation == 1 and algo.q == 1  # the generation counts; the quality cycles
    # a child that scored 0 everywhere (a real model) does take the empty cell
    children = algo.ask(None)
    algo.tell(children, [{t: np.zeros(4) for t in TASKS} for _ in children])
    assert [s[0] for s in algo.last_status] == [2, 0]  # NEW, then no better than the first
    assert all(a.get((0, 0)) is not None for a in algo.archives)


def test_a_failed_expert_ends_the_run_with_its_name():
    algo = _make()
    seeds = algo.ask(None)
    scores = [_toy_scores(r, np.random.default_rng(0)) for r in seeds]
    scores[1] = _failed([seeds[1]])[0]
    with pytest.raises(TaskError, match=r"cycleqd: expert 'e1' failed to build or score"):
        algo.tell(seeds, scores)


def test_a_failed_aggregate_leaves_the_best_elite_as_best():
    algo = _make(generations=2, children=2)
    _drive(algo, 3, np.random.default_rng(12))  # the experts, then two generations
    best_elite = algo.best
    assert algo.stop() == []  # the aggregate is still to ask
    agg = algo.ask(None)
    assert agg == [algo.aggregate_recipe()]
    algo.tell(agg, _failed(agg))
    assert algo.best == best_elite and algo.stop() == ["2 generations done"]


def test_a_childs_crossover_weights_spread_as_omega_does():
    """w_A = ω_A / (ω_A + ω_B) with ω ~ N(1, 0.01²): to first order 1/2 + (ω_A − ω_B)/4,
    so its standard deviation is 0.01 · √2 / 4 ≈ 0.00354."""
    algo = _make(children=4000, mutation="none")
    _drive(algo, 1, np.random.default_rng(13))  # the experts
    w = np.array([[m["parameters"]["weight"] for m in r["models"]] for r in algo.ask(None)])
    assert w.sum(axis=1) == pytest.approx(np.ones(len(w)))
    assert w[:, 0].mean() == pytest.approx(0.5, abs=3 * 0.00354 / np.sqrt(len(w)))
    assert w[:, 0].std() == pytest.approx(0.01 * np.sqrt(2) / 4, rel=0.05)


@pytest.mark.parametrize("sampling", ["paper", "reference", "uniform"])
def test_the_first_parent_is_drawn_as_the_sampling_option_says(sampling):
    """The first parent of each child is drawn ∝ its elite weight in the quality task's
    archive (1 each for uniform sampling); the bounds make the three options differ."""
    algo = _make(children=20000, mutation="none", sampling=sampling)
    seeds = algo.ask(None)
    algo.tell(seeds, [_toy_scores(r, np.random.default_rng(0)) for r in seeds])
    children = algo.ask(2)  # two more elites of archive t0, unlike the experts
    algo.tell(children, [{t: np.full(4, v) for t in TASKS} for v in (0.6, 0.9)])
    elites = [e for _, e in algo.archives[algo.q]]
    assert len(elites) == 5
    cols = np.array([[e.quality, *e.behaviour] for e in elites])
    low, high = {"paper": (0.5, 0.8), "reference": (0.5, 1.3), "uniform": (1.0, 1.0)}[sampling]
    want = elite_weights(cols, low, high)  # (hand-checked above); uniform: all ones
    want = want / want.sum()
    first = Counter(r["models"][0]["model"] for r in algo.ask(None))
    got = np.array([first[e.data["ref"]] for e in elites]) / 20000
    assert np.abs(got - want).max() < 0.015
    if sampling != "uniform":
        assert np.abs(want - 1 / len(elites)).max() > 0.05  # distinguishable from uniform
