"""M2N2's maths and state machine against hand-computed small cases (no model needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shoal.errors import RecipeError, StateError
from shoal.search.algorithms.base import ALGORITHMS, SearchContext, store_key
from shoal.search.algorithms.m2n2 import (
    M2N2,
    attraction,
    capacity,
    coverage,
    drop_index,
    mean_entropy,
    partner_weights,
    resource_fitness,
    select_parents,
)

S3 = np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def test_registered() -> None:
    assert ALGORITHMS["m2n2"] is M2N2


def test_fitness_hand_computed_alpha_1() -> None:
    # z = [2, 1, 1] -> example values [1/2, 1, 1]
    f = resource_fitness(S3, alpha=1.0, eps=0.0)
    np.testing.assert_allclose(f, [1.5, 0.5, 1.0])


def test_fitness_alpha_2_and_eps() -> None:
    # z² = [4, 1, 1] -> [1/4, 1, 1]
    np.testing.assert_allclose(resource_fitness(S3, alpha=2.0, eps=0.0), [1.25, 0.25, 1.0])
    # ε enters the denominator: z + ε
    eps = 0.5
    want = [1 / 2.5 + 1 / 1.5, 1 / 2.5, 1 / 1.5]
    np.testing.assert_allclose(resource_fitness(S3, alpha=1.0, eps=eps), want)


def test_alpha_0_is_plain_accuracy() -> None:
    # GA = α 0: no competition, fitness is the number of examples solved (/(1 + ε))
    s = np.random.default_rng(0).integers(0, 2, (6, 40)).astype(float)
    s[:, 0] = 0.0  # an example nobody solves: z = 0, 0**0 = 1, still no division by zero
    np.testing.assert_allclose(resource_fitness(s, alpha=0.0, eps=1e-8), s.sum(1) / (1 + 1e-8))


def test_continuous_capacity_is_column_max() -> None:
    s = np.array([[0.5, 1.0], [0.25, 0.0]])
    np.testing.assert_allclose(capacity(s), [0.5, 1.0])
    np.testing.assert_allclose(capacity(S3), [1.0, 1.0, 1.0])
    # c = [0.5, 1], z = [0.75, 1] -> f0 = 0.5·0.5/0.75 + 1, f1 = 0.25·0.5/0.75
    np.testing.assert_allclose(resource_fitness(s, eps=0.0), [0.5 * 0.5 / 0.75 + 1, 0.25 / 1.5])
    # forcing binary capacity on continuous scores uses c = 1
    np.testing.assert_allclose(capacity(s, "binary"), [1.0, 1.0])


def test_attraction_hand_computed() -> None:
    # A = 1 solves only example 0; B = 0 brings example 1 (value 1), B = 2 example 2 (value 1)
    np.testing.assert_allclose(attraction(S3, 1, eps=0.0), [1.0, 0.0, 1.0])
    # A = 0: member 1 brings nothing, member 2 brings example 2
    np.testing.assert_allclose(attraction(S3, 0, eps=0.0), [0.0, 0.0, 1.0])
    # loop form, written independently
    z = S3.sum(0)
    for a in range(3):
        want = [sum(max(S3[b, j] - S3[a, j], 0) / z[j] for j in range(3)) for b in range(3)]
        np.testing.assert_allclose(attraction(S3, a, eps=0.0), want)


def test_attraction_all_zero_falls_back_to_fitness() -> None:
    s = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    f = resource_fitness(s, eps=0.0)  # z = [2, 2, 1] -> f = [2, .5, .5]
    np.testing.assert_allclose(attraction(s, 0, eps=0.0), [0.0, 0.0, 0.0])
    w = partner_weights(s, 0, f)
    np.testing.assert_allclose(w, [0.0, 0.5, 0.5])
    # nobody scores anything: uniform over the others, never A, no division by zero
    zero = np.zeros((3, 4))
    with np.errstate(all="raise"):
        w0 = partner_weights(zero, 1, resource_fitness(zero))
    np.testing.assert_allclose(w0, [1.0, 0.0, 1.0])


def test_parent_sampling_frequencies() -> None:
    rng = np.random.default_rng(1)
    n = 20000
    counts_a = np.zeros(3)
    pairs = {}
    for _ in range(n):
        a, b = select_parents(S3, rng, eps=0.0)
        counts_a[a] += 1
        pairs[(a, b)] = pairs.get((a, b), 0) + 1
    # A ∝ f = [1.5, .5, 1]
    np.testing.assert_allclose(counts_a / n, [0.5, 1 / 6, 1 / 3], atol=0.015)
    # given A = 0, B is always 2 (the only one attracting); given A = 1, B ∈ {0, 2} equally
    assert pairs.get((0, 1), 0) == 0
    assert abs(pairs[(1, 0)] - pairs[(1, 2)]) < 0.1 * (pairs[(1, 0)] + pairs[(1, 2)])
    assert all(a != b for a, b in pairs)


@pytest.mark.parametrize("matchmaker", ["attraction", "fitness"])
def test_select_parents_draws_as_partner_weights_say(matchmaker) -> None:
    """select_parents reuses the fitness's example weights for g(A, ·): the same draws as
    choosing A ∝ resource_fitness and B ∝ partner_weights, one uniform each."""
    from shoal.search.algorithms.base import choose_index

    scores = np.random.default_rng(3).random((7, 40)).round(1)  # continuous, ties, zeros
    scores[2] = 0.0
    rng, ref = np.random.default_rng(4), np.random.default_rng(4)
    for _ in range(200):
        got = select_parents(scores, rng, alpha=0.7, matchmaker=matchmaker, capacity_mode="max")
        cap = capacity(scores, "max")
        f = resource_fitness(scores, 0.7, 1e-8, cap)
        a = choose_index(ref, f)
        w = partner_weights(scores, a, f, alpha=0.7, matchmaker=matchmaker, cap=cap)
        assert got == (a, choose_index(ref, w))


def test_ga_setting_selects_proportional_to_accuracy() -> None:
    s = np.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    rng = np.random.default_rng(2)
    n = 20000
    counts = np.zeros(3)
    for _ in range(n):
        a, _b = select_parents(s, rng, alpha=0.0, matchmaker="fitness")
        counts[a] += 1
    acc = s.sum(1)
    np.testing.assert_allclose(counts / n, acc / acc.sum(), atol=0.015)


def test_drop_lowest_fitness_ties_drop_older() -> None:
    s = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # f = [.5, 1, .5]
    assert drop_index(s, [0, 1, 2], eps=0.0) == 0
    assert drop_index(s, [5, 1, 2], eps=0.0) == 2
    assert drop_index(S3, [0, 1, 2], eps=0.0) == 1  # f = [1.5, .5, 1]


def test_diversity_measures() -> None:
    assert coverage(S3) == 1.0
    assert coverage(np.array([[1.0, 0.0], [1.0, 0.0]])) == 0.5
    # p = [2/3, 1/3, 1/3]: H = h(1/3) for each column
    h = -(1 / 3) * np.log2(1 / 3) - (2 / 3) * np.log2(2 / 3)
    assert mean_entropy(S3) == pytest.approx(h)
    assert mean_entropy(np.ones((4, 3))) == 0.0


# -- the state machine ------------------------------------------------------------------------


def _toy_scores(recipe: dict, n: int = 12) -> dict[str, np.ndarray]:
    """Deterministic fake per-example scores from the recipe's hash."""
    h = int(store_key(recipe), 16)
    rng = np.random.default_rng(h % 2**32)
    return {"train": (rng.random(n) < 0.4).astype(float)}


def _drive(algo: M2N2, evaluations: int) -> list[dict]:
    seen = []
    while algo.evaluations < evaluations:
        recipes = algo.ask()
        algo.tell(recipes, [_toy_scores(r) for r in recipes])
        seen.extend(recipes)
    return seen


def test_seed_warmup_then_steady_state() -> None:
    algo = M2N2({"archive_size": 5, "seed": 3, "warmup": "random"}, seeds=["a", "b"])
    seen = _drive(algo, 12)
    assert seen[:2] == [{"model": "a"}, {"model": "b"}]
    # warm-up: random merges among the seeds until the archive is full (5 members)
    for r in seen[2:5]:
        assert r["merge_method"] == "splitpoint"
        assert {m["model"] for m in r["models"]} == {"a", "b"}
        assert "mutation" not in r  # from seeds: no mutation
    assert len(algo.refs) == 5 and algo.scores.shape == (5, 12)
    assert algo.references() <= {store_key(r) for r in seen}
    # parents of later children are archive members of that time
    assert all(0.0 <= r["parameters"]["split"] <= 1.0 for r in seen[2:])


def test_warmup_merges_only_the_initial_members_that_did_not_fail() -> None:
    algo = M2N2({"archive_size": 5, "seed": 3, "warmup": "random"}, seeds=["a", "b", "c"])
    for told in (_toy_scores({"model": "a"}), {"train": np.full(12, np.nan)}):
        algo.tell(algo.ask(), [told])
    algo.tell(algo.ask(), [_toy_scores({"model": "c"})])
    assert algo.refs == ["a", "c"]  # b failed
    for _ in range(3):  # the warm-up merges the two that joined, and only them
        (child,) = algo.ask()
        assert {m["model"] for m in child["models"]} == {"a", "c"}
        algo.tell([child], [_toy_scores(child)])


def test_scratch_init_and_mutation() -> None:
    algo = M2N2({"init": "scratch", "archive_size": 4, "seed": 0, "initial": 3})
    seen = _drive(algo, 8)
    assert [r["merge_method"] for r in seen[:4]] == ["random_init"] * 3 + ["splitpoint"]
    assert all(r["parameters"]["std"] == 0.01 for r in seen[:3])
    assert len({store_key(r) for r in seen[:3]}) == 3  # distinct store keys
    assert all(r["mutation"] == 0.01 for r in seen[3:])
    assert len(algo.references()) == 4


def test_select_warmup_fills_archive_with_selected_children() -> None:
    # reference protocol: two members, then children chosen by M2N2 fill the archive
    algo = M2N2({"init": "scratch", "archive_size": 6, "seed": 2})
    seen = _drive(algo, 6)
    assert [r["merge_method"] for r in seen] == ["random_init"] * 2 + ["splitpoint"] * 4
    assert algo.births == [0, 1, 2, 3, 4, 5]  # nothing dropped while filling
    # the third child may already have a child as parent
    refs = {store_key(r) for r in seen}
    for r in seen[2:]:
        assert all(m["model"][len("store:") :] in refs for m in r["models"])


def test_no_splitpoint_means_whole_vector_slerp() -> None:
    algo = M2N2({"splitpoint": False, "archive_size": 3}, seeds=["a", "b"])
    seen = _drive(algo, 6)
    assert all(r["parameters"]["split"] == 1.0 for r in seen[2:])


def test_chromosomes_give_filter_lists() -> None:
    algo = M2N2({"chromosomes": ["attn"], "archive_size": 3}, seeds=["a", "b"])
    seen = _drive(algo, 3)
    split = seen[2]["parameters"]["split"]
    assert [e.get("filter") for e in split] == ["attn", None]


def test_archive_replacement_matches_hand_recomputation() -> None:
    algo = M2N2({"archive_size": 3, "seed": 5}, seeds=["a", "b"])
    _drive(algo, 3)
    before = algo.scores.copy()
    births = list(algo.births)
    recipes = algo.ask()
    child = _toy_scores(recipes[0])["train"]
    algo.tell(recipes, [{"train": child}])
    full = np.vstack([before, child])
    d = drop_index(full, [*births, 3])
    np.testing.assert_array_equal(algo.scores, np.delete(full, d, axis=0))


def test_determinism_by_seed() -> None:
    a = _drive(M2N2({"seed": 7, "archive_size": 4}, seeds=["a", "b"]), 30)
    b = _drive(M2N2({"seed": 7, "archive_size": 4}, seeds=["a", "b"]), 30)
    c = _drive(M2N2({"seed": 8, "archive_size": 4}, seeds=["a", "b"]), 30)
    assert a == b
    assert a != c


def test_state_round_trip_resumes_identically() -> None:
    opts = {"seed": 11, "archive_size": 4, "batch_size": 2}
    full = M2N2(opts, seeds=["a", "b"])
    seen_full = _drive(full, 40)
    half = M2N2(opts, seeds=["a", "b"])
    seen_half = _drive(half, 20)
    state = json.loads(json.dumps(half.state_dict()))  # plain JSON data
    resumed = M2N2(opts, seeds=["a", "b"])
    resumed.load_state_dict(state)
    seen_rest = _drive(resumed, 40)
    assert seen_half + seen_rest == seen_full
    assert resumed.refs == full.refs
    np.testing.assert_array_equal(resumed.scores, full.scores)


def test_state_with_other_options_is_refused() -> None:
    algo = M2N2({"seed": 1}, seeds=["a", "b"])
    other = M2N2({"seed": 2}, seeds=["a", "b"])
    with pytest.raises(StateError, match="other options"):
        other.load_state_dict(algo.state_dict())


def test_batched_variant_inserts_each_child() -> None:
    algo = M2N2({"batch_size": 4, "archive_size": 3}, seeds=["a", "b"])
    assert len(algo.ask()) == 2  # the seeds first
    algo.tell(algo._pending or [], [_toy_scores(r) for r in algo._pending or []])
    recipes = algo.ask()
    assert len(recipes) == 4
    algo.tell(recipes, [_toy_scores(r) for r in recipes])
    assert len(algo.refs) == 3 and algo.evaluations == 6


def test_bad_options_and_order() -> None:
    with pytest.raises(RecipeError, match="archive_size"):
        M2N2({"archive_size": 1}, seeds=["a", "b"])
    with pytest.raises(RecipeError, match="matchmaker"):
        M2N2({"matchmaker": "love"}, seeds=["a", "b"])
    with pytest.raises(RecipeError, match=r"algorithm\.archive_sise: unknown option"):
        M2N2({"archive_sise": 3}, seeds=["a", "b"])
    with pytest.raises(RecipeError, match="≥ 2 source models"):
        M2N2({}, seeds=["a"])
    algo = M2N2({}, seeds=["a", "b"])
    algo.ask()
    with pytest.raises(StateError):
        algo.ask()


def test_best_is_best_training_member() -> None:
    algo = M2N2({"archive_size": 4}, seeds=["a", "b"])
    _drive(algo, 10)
    best = algo.best
    assert best is not None
    i = algo.refs.index(best.extra["ref"])
    assert best.fitness == pytest.approx(algo.scores[i].mean())
    assert best.fitness == pytest.approx(algo.scores.mean(1).max())


def test_from_config_uses_context() -> None:
    ctx = SearchContext(models={"x": "/p/x", "y": "/p/y"}, seed=9, task_names=("t1", "t2"))
    algo = M2N2.from_config({"archive_size": 4}, ctx)
    assert algo.seeds == ["x", "y"] and algo.options.seed == 9
    assert algo.options.tasks == ["t1", "t2"]
    scratch = M2N2.from_config({"init": "scratch"}, ctx)
    assert scratch.seeds == [] and scratch.options.sigma == 0.01
    assert M2N2.keep_models


def test_scores_concatenate_fitness_tasks_in_order() -> None:
    algo = M2N2({"tasks": ["b", "a"], "archive_size": 2}, seeds=["s", "t"])
    recipes = algo.ask()
    algo.tell(recipes, [{"a": np.array([1.0]), "b": np.array([0.0, 1.0]), "test": np.ones(3)}])
    recipes = algo.ask()
    algo.tell(recipes, [{"a": np.array([np.nan]), "b": np.array([1.0, 1.0])}])
    np.testing.assert_array_equal(algo.scores, [[0, 1, 1], [1, 1, 0]])
    with pytest.raises(StateError, match="lack fitness task"):
        algo.tell(algo.ask(), [{"a": np.array([1.0])}])


def test_a_failed_candidate_never_joins_the_archive() -> None:
    """Told as NaN everywhere (how the runner tells a failure), a child takes no free
    place and displaces no member: it left no stored model for a crossover to name."""
    algo = M2N2({"tasks": ["a"], "archive_size": 3}, seeds=["s", "t"])
    failed = {"a": np.full(2, np.nan)}
    for told in ({"a": np.array([1.0, 0.0])}, {"a": np.array([0.0, 1.0])}, failed):
        algo.tell(algo.ask(), [told])
    assert algo.refs == ["s", "t"]  # a place was free; the failure did not take it
    algo.tell(algo.ask(), [{"a": np.array([1.0, 1.0])}])
    full = list(algo.refs)
    assert len(full) == 3
    algo.tell(algo.ask(), [failed])
    assert algo.refs == full
    np.testing.assert_array_equal(algo.scores, [[1, 0], [0, 1], [1, 1]])


def test_column_sums_grow_by_a_row_to_the_last_bit() -> None:
    """M2N2 keeps its archive's column sums: S.sum(axis=0) + v must be the sum of S with
    v appended, bit for bit, for continuous scores too (numpy adds a column's rows in order)."""
    rng = np.random.default_rng(0)
    for rows in (1, 2, 7, 20, 21, 64):
        s = rng.random((rows, 1437)) * rng.choice([1e-3, 1.0, 1e3], size=(rows, 1))
        v = rng.random(1437)
        np.testing.assert_array_equal(s.sum(axis=0) + v, np.vstack([s, v]).sum(axis=0))


def _reference_run(opts: dict, scores_of, steps: int) -> tuple[list[dict], np.ndarray]:
    """M2N2's steady state written straight from the functions (no kept statistics): the
    second implementation the state machine is checked against."""
    algo = M2N2(opts, seeds=["a", "b"])  # only for its recipes and random stream
    o = algo.options
    recipes, scores, births, seen = [], [], [], []
    for i in range(steps):
        if i < 2:
            recipe = {"model": "ab"[i]}
        else:
            mode = "binary" if np.all((np.array(scores) == 0) | (np.array(scores) == 1)) else "max"
            a, b = select_parents(
                np.array(scores),
                algo._rng,
                alpha=o.alpha,
                matchmaker=o.matchmaker,
                capacity_mode=mode,
            )
            algo.refs = [
                "a"
                if r == {"model": "a"}
                else "b"
                if r == {"model": "b"}
                else "store:" + store_key(r)
                for r in recipes
            ]
            recipe = algo._child_recipe(a, b)
        seen.append(recipe)
        vec = scores_of(recipe)
        recipes.append(recipe)
        scores.append(vec)
        births.append(i)
        if len(recipes) > o.archive_size:
            full = np.array(scores)
            mode = "binary" if np.all((full == 0) | (full == 1)) else "max"
            d = drop_index(full, births, alpha=o.alpha, capacity_mode=mode)
            for lst in (recipes, scores, births):
                del lst[d]
    return seen, np.array(scores)


@pytest.mark.parametrize("binary", [True, False])
def test_state_machine_equals_the_functions_step_by_step(binary: bool) -> None:
    """The archive M2N2 keeps (its statistics carried from step to step, a dropped child
    leaving them as they were) is the one the plain functions give, to the last bit."""

    def scores_of(recipe: dict) -> np.ndarray:
        rng = np.random.default_rng(int(store_key(recipe), 16) % 2**32)
        v = rng.random(40)
        return (v < 0.4).astype(float) if binary else v**3

    opts = {"archive_size": 5, "seed": 3, "alpha": 0.7}
    want_seen, want_scores = _reference_run(opts, scores_of, 300)
    algo = M2N2(opts, seeds=["a", "b"])
    seen = []
    while algo.evaluations < 300:
        recipes = algo.ask()
        algo.tell(recipes, [{"train": scores_of(r)} for r in recipes])
        seen.extend(recipes)
    assert seen == want_seen
    np.testing.assert_array_equal(algo.scores, want_scores)


def test_attraction_of_binary_scores_by_the_short_product_is_the_same_to_the_bit() -> None:
    from shoal.search.algorithms.m2n2 import _gain

    rng = np.random.default_rng(1)
    for rows, cols in ((2, 5), (20, 1437), (33, 100)):
        s = (rng.random((rows, cols)) < 0.5).astype(float)
        w = rng.random(cols) * rng.choice([1e-6, 1.0, 1e6], size=cols)
        for a in range(rows):
            np.testing.assert_array_equal(_gain(s, a, w, binary=True), _gain(s, a, w))
