"""The ``svd_mutation`` recipe key and CycleQD's crossover recipe, built on 2 × 2 matrices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shoal.errors import MergeError
from shoal.executors.build import SourceMap, build_candidate, generator_for, svd_factors

BASE_W = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
BIAS = torch.tensor([0.5, -0.5])


def _model() -> nn.Module:
    return nn.Linear(2, 2)


def _sources(taus: dict[str, torch.Tensor]) -> SourceMap:
    models = {"base": {"weight": BASE_W, "bias": BIAS}}
    for name, tau in taus.items():
        models[name] = {"weight": BASE_W + tau, "bias": BIAS + 1.0}
    return SourceMap({k: k for k in models}, None, lambda path: models[path])


def _spec(**kw):
    return {"expert": "e", "base": "base", "w_max": 0.1, "seed": 7, **kw}


def test_diagonal_task_vector_moves_each_singular_direction_by_w_sigma():
    sources = _sources({"e": torch.diag(torch.tensor([3.0, 1.0]))})  # U = V = I, σ = (3, 1)
    out = build_candidate(_model(), {"model": "base", "svd_mutation": _spec()}, sources, 0)
    w = torch.rand(2, generator=generator_for(7, 3)) * 0.1  # the stream the spec names
    want = BASE_W + torch.diag(torch.tensor([3.0, 1.0]) * w)
    assert torch.allclose(out.weight, want, atol=1e-6)
    assert torch.equal(out.bias.detach(), BIAS)  # 1-D tensors pass through
    assert 0 <= float(w.max()) <= 0.1


def test_rank_one_task_vector_gives_a_multiple_of_itself_and_rank_truncates():
    tau = torch.outer(torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]))  # rank 1
    recipe = {"model": "base", "svd_mutation": _spec()}
    out = build_candidate(_model(), recipe, _sources({"e": tau}), 0)
    delta = out.weight.detach() - BASE_W
    scale = float(delta[0, 0] / tau[0, 0])
    assert 0.0 <= scale <= 0.1 and torch.allclose(delta, scale * tau, atol=1e-6)
    # rank 1 of diag(3, 1): only the first direction moves
    sources = _sources({"e": torch.diag(torch.tensor([3.0, 1.0]))})
    out = build_candidate(_model(), {"model": "base", "svd_mutation": _spec(rank=1)}, sources, 0)
    delta = out.weight.detach() - BASE_W
    assert delta[0, 0] > 0 and delta[1, 1] == 0 and delta[0, 1] == 0 and delta[1, 0] == 0
    u, s, vh = svd_factors(sources, "e", "base", 1)["weight"]
    assert u.shape == (2, 1) and s.tolist() == [3.0] and vh.shape == (1, 2)
    assert ("e", "base", 1) in sources.svd_cache  # computed once per (expert, base, rank)


def test_seed_from_the_work_item_unless_the_spec_names_one():
    sources = _sources({"e": torch.diag(torch.tensor([3.0, 1.0]))})
    spec = {"expert": "e", "base": "base"}
    a = build_candidate(_model(), {"model": "base", "svd_mutation": spec}, sources, 1).weight
    b = build_candidate(_model(), {"model": "base", "svd_mutation": spec}, sources, 2).weight
    c = build_candidate(_model(), {"model": "base", "svd_mutation": _spec()}, sources, 1).weight
    d = build_candidate(_model(), {"model": "base", "svd_mutation": _spec()}, sources, 2).weight
    assert not torch.equal(a, b) and torch.equal(c, d)


def test_crossover_recipe_is_base_plus_normalised_omega_task_vectors():
    tau_a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    tau_b = torch.tensor([[0.0, 4.0], [-2.0, 0.0]])
    sources = _sources({"a": tau_a, "b": tau_b})
    omega = torch.tensor([1.02, 0.97])
    w = omega / omega.sum()
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": "a", "parameters": {"weight": float(w[0])}},
            {"model": "b", "parameters": {"weight": float(w[1])}},
        ],
        "parameters": {"lambda": 1.0, "normalize": False},
    }
    out = build_candidate(_model(), recipe, sources, 0)
    want = BASE_W + (omega[0] * tau_a + omega[1] * tau_b) / omega.sum()
    assert torch.allclose(out.weight, want, atol=1e-6)
    assert torch.allclose(out.bias, BIAS + 1.0, atol=1e-6)  # both τ of the bias are 1
    # and the mutation follows the merge
    mutated = build_candidate(_model(), {**recipe, "svd_mutation": _spec(expert="a")}, sources, 0)
    assert not torch.allclose(mutated.weight, want)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"expert": "e"}, "needs a mapping"),
        ({"expert": "nope", "base": "base"}, "unknown model 'nope'"),
        ({"expert": "e", "base": "base", "sigma": 1}, "unknown key"),
    ],
)
def test_a_bad_spec_fails_the_candidate(spec, needle):
    sources = _sources({"e": torch.eye(2)})
    with pytest.raises(MergeError, match=needle):
        build_candidate(_model(), {"model": "base", "svd_mutation": spec}, sources, 0)


def test_factors_are_kept_in_the_run_folder_and_read_back(tmp_path, monkeypatch):
    tau = torch.tensor([[3.0, 1.0], [0.5, -2.0]])
    first = _sources({"e": tau})
    first.svd_dir = tmp_path / "svd"
    want = svd_factors(first, "e", "base", None)
    assert len(list((tmp_path / "svd").glob("*.safetensors"))) == 1
    second = _sources({"e": tau})  # another worker, or a resumed run
    second.svd_dir = tmp_path / "svd"

    def no_svd(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    got = svd_factors(second, "e", "base", None)
    assert got.keys() == want.keys()
    assert all(torch.equal(g, w) for n in want for g, w in zip(got[n], want[n], strict=True))
    other_rank = _sources({"e": tau})  # another rank is another file
    other_rank.svd_dir = tmp_path / "svd"
    with pytest.raises(AssertionError, match="recomputed"):
        svd_factors(other_rank, "e", "base", 1)
