"""CEM: finds a known optimum, breaks ties by the second number, resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shoal.adapt.cem import CEM
from shoal.errors import StateError


def _sphere(alpha: np.ndarray, target: np.ndarray) -> np.ndarray:
    return -((alpha - target) ** 2).sum(axis=1)


def test_defaults_are_the_published_setting() -> None:
    cem = CEM(4)
    assert (cem.population, cem.num_elites, cem.dim) == (32, 6, 4)
    np.testing.assert_array_equal(cem.mean, np.full(4, 0.25))
    np.testing.assert_array_equal(cem.std, np.full(4, 0.5))
    assert CEM(3, num_matrices=5).dim == 15


def test_finds_interior_optimum() -> None:
    target = np.array([0.2, 0.9, 0.5])
    cem = CEM(3, seed=1)
    for _ in range(50):
        alpha = cem.ask()
        cem.tell(_sphere(alpha, target))
    assert cem.best is not None
    np.testing.assert_allclose(cem.best.alpha, target, atol=0.03)
    np.testing.assert_allclose(cem.mean, target, atol=0.03)


def test_clamps_to_unit_box() -> None:
    target = np.array([1.4, -0.3, 0.5, 0.5])  # the best point in [0, 1]^4 is (1, 0, .5, .5)
    cem = CEM(2, num_matrices=2, seed=2)
    for _ in range(60):
        alpha = cem.ask()
        assert alpha.min() >= 0.0 and alpha.max() <= 1.0
        cem.tell(_sphere(alpha, target))
    assert cem.best is not None
    np.testing.assert_allclose(cem.best.alpha, [1.0, 0.0, 0.5, 0.5], atol=0.03)


def test_elites_ranked_by_score_then_tie_break() -> None:
    cem = CEM(2, population=5, elite_ratio=0.4, seed=0)  # 2 elites
    alpha = cem.ask()
    cem.tell([1.0, 1.0, 0.0, 1.0, 0.5], [0.1, 0.3, 9.0, 0.2, 0.0])
    elites = alpha[[1, 3]]  # score 1 with the two highest tie breaks, best first
    np.testing.assert_allclose(cem.mean, elites.mean(axis=0))
    np.testing.assert_allclose(cem.std, elites.std(axis=0))
    assert cem.best is not None
    np.testing.assert_array_equal(cem.best.alpha, alpha[1])
    assert (cem.best.score, cem.best.tie_break, cem.best.iteration) == (1.0, 0.3, 0)
    # a later tie in score with a better tie break replaces the best; a worse one does not
    alpha2 = cem.ask()
    cem.tell([1.0, 0.0, 0.0, 0.0, 0.0], [0.2, 0, 0, 0, 0])
    np.testing.assert_array_equal(cem.best.alpha, alpha[1])
    cem.ask()
    cem.tell([0.0, 0.0, 1.0, 0.0, 0.0], [0, 0, 0.4, 0, 0])
    assert cem.best.iteration == 2 and cem.best.tie_break == 0.4
    assert alpha2.shape == (5, 2)


def test_equal_scores_search_on_the_tie_break() -> None:
    """With a flat score (few examples), the log-likelihood alone steers the search."""
    target = np.array([0.7, 0.1])
    cem = CEM(2, seed=3)
    for _ in range(40):
        alpha = cem.ask()
        cem.tell(np.full(len(alpha), 0.5), _sphere(alpha, target))
    assert cem.best is not None
    np.testing.assert_allclose(cem.best.alpha, target, atol=0.03)


def test_nan_scores_count_as_worst() -> None:
    cem = CEM(1, population=4, elite_ratio=0.25, seed=0)
    alpha = cem.ask()
    cem.tell([float("nan"), -5.0, float("inf"), -6.0])  # +inf is not finite either
    np.testing.assert_array_equal(cem.mean, alpha[1])
    assert cem.best is not None and cem.best.score == -5.0


def test_state_round_trip_continues_identically() -> None:
    target = np.array([0.3, 0.6, 0.8])
    a = CEM(3, seed=7)
    for _ in range(5):
        x = a.ask()
        a.tell(_sphere(x, target), -np.abs(x).sum(axis=1))
    saved = json.loads(json.dumps(a.state_dict()))  # plain data
    with pytest.raises(StateError, match="population 32, this CEM has 16"):
        CEM(3, population=16).load_state_dict(saved)
    b = CEM(3, seed=99)  # the saved state wins over the seed
    b.ask()  # some other history, overwritten by the load
    b.tell(np.zeros(32))
    b.load_state_dict(saved)
    for _ in range(5):
        xa, xb = a.ask(), b.ask()
        np.testing.assert_array_equal(xa, xb)
        a.tell(_sphere(xa, target))
        b.tell(_sphere(xb, target))
    assert a.best is not None and b.best is not None
    np.testing.assert_array_equal(a.best.alpha, b.best.alpha)
    assert a.state_dict() == b.state_dict() and b.seed == 7


def test_out_of_order_calls() -> None:
    cem = CEM(2)
    with pytest.raises(StateError, match="without ask"):
        cem.tell(np.zeros(32))
    cem.ask()
    with pytest.raises(StateError, match="ask\\(\\) again"):
        cem.ask()
    with pytest.raises(StateError, match="between ask"):
        cem.state_dict()
    with pytest.raises(StateError, match="3 scores for 32"):
        cem.tell([1.0, 2.0, 3.0])
    with pytest.raises(StateError, match="2 tie breaks"):
        cem.tell(np.zeros(32), [0.0, 1.0])
    cem.tell(np.zeros(32))
    with pytest.raises(StateError, match="'cmaes'"):
        cem.load_state_dict({"algorithm": "cmaes"})
    with pytest.raises(StateError, match="elite_ratio"):
        CEM(2, elite_ratio=0.0)


def test_few_shot_mixture_recovers_known_weights(make_llama: object) -> None:
    """CEM over α with mix_z on a wrapped model finds the α that made the target outputs."""
    import torch

    from shoal.adapt.expert import mix_z
    from shoal.adapt.svf import wrap_svf

    svf = wrap_svf(make_llama(0))  # type: ignore[operator]
    g = torch.Generator().manual_seed(0)
    experts = [
        {n: 2 * torch.rand(r, generator=g) for n, r in svf.lengths().items()} for _ in range(2)
    ]
    ids = torch.randint(0, 64, (2, 8), generator=g)
    true_alpha = np.array([0.3, 0.8])
    with torch.no_grad(), svf.using_z(mix_z(experts, true_alpha)):
        target = svf(input_ids=ids).logits
    cem = CEM(2, seed=0)
    for _ in range(10):
        alphas = cem.ask()
        scores = []
        with torch.no_grad():
            for alpha in alphas:
                with svf.using_z(mix_z(experts, alpha)):
                    scores.append(-float(((svf(input_ids=ids).logits - target) ** 2).mean()))
        cem.tell(scores)
    assert cem.best is not None
    np.testing.assert_allclose(cem.best.alpha, true_alpha, atol=0.05)
