"""M2N2's flat-vector fast path: split-point children by hand, digits runs, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from shoal.errors import StateError
from shoal.executors.build import generator_for
from shoal.search.base import store_key
from shoal.search.m2n2 import M2N2
from shoal.search.m2n2_flat import FlatM2N2, FlatModel, History
from shoal.tasks.classification import ClassificationTask, image_tasks
from shoal.testbed.images import build_mlp, digits_mlp, load_digits_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _np_slerp(a: np.ndarray, b: np.ndarray, t: float, cos: float) -> np.ndarray:
    om = math.acos(cos)
    return (math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)


def _tiny() -> FlatModel:
    return FlatModel(nn.Linear(1, 2))  # weight (2, 1) then bias (2,): n = 4


def _child(runner: FlatM2N2, split: float, ratio: float, angle: str, **extra) -> torch.Tensor:
    recipe = {
        "merge_method": "splitpoint",
        "models": [{"model": "a"}, {"model": "b"}],
        "parameters": {"split": split, "ratio": ratio, "angle": angle},
        **extra,
    }
    return runner.build(recipe)


A = torch.tensor([1.0, 0.0, 2.0, 0.0])
B = torch.tensor([0.0, 1.0, 1.0, 2.0])


def _runner(model: FlatModel | None = None, chromosomes: list[str] | None = None) -> FlatM2N2:
    algo = M2N2({"archive_size": 3, "chromosomes": chromosomes}, seeds=["a", "b"])
    return FlatM2N2(algo, model or _tiny(), {}, sources={"a": A, "b": B})


def test_splitpoint_segment_angle_by_hand() -> None:
    child = _child(_runner(), split=0.5, ratio=0.25, angle="segment")
    a, b = A.numpy().astype(float), B.numpy().astype(float)
    # first half: [1,0] vs [0,1], 90°, t = 0.25; second half: [2,0] vs [1,2], t = 0.75
    first = [math.cos(math.pi / 8), math.sin(math.pi / 8)]
    cos2 = (2 * 1) / (2 * math.sqrt(5))
    second = _np_slerp(a[2:], b[2:], 0.75, cos2)
    np.testing.assert_allclose(child.numpy(), [*first, *second], rtol=1e-6)


def test_splitpoint_global_angle_and_extremes() -> None:
    r = _runner()
    a, b = A.numpy().astype(float), B.numpy().astype(float)
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    child = _child(r, split=0.25, ratio=0.6, angle="global")
    want = np.concatenate([_np_slerp(a, b, 0.6, cos)[:1], _np_slerp(a, b, 0.4, cos)[1:]])
    np.testing.assert_allclose(child.numpy(), want, rtol=1e-6)
    # split 1.0: everything before, t = ratio; ratio 0 then gives A exactly
    np.testing.assert_allclose(_child(r, 1.0, 0.0, "global").numpy(), a, atol=1e-7)
    # split 0: everything after, t = 1 - ratio; ratio 0 gives B
    np.testing.assert_allclose(_child(r, 0.0, 0.0, "global").numpy(), b, atol=1e-6)


def test_mutation_is_seeded_gaussian() -> None:
    r = _runner()
    plain = _child(r, 0.5, 0.3, "segment")
    recipe = {
        "merge_method": "splitpoint",
        "models": [{"model": "a"}, {"model": "b"}],
        "parameters": {"split": 0.5, "ratio": 0.3, "angle": "segment"},
        "mutation": 0.5,
    }
    mutated = r.build(recipe, seed=9)
    # the executors' stream 2 of the candidate seed, drawn tensor by tensor (weight, bias)
    gen = generator_for(9, 2)
    noise = torch.cat([torch.randn(2, 1, generator=gen).reshape(-1), torch.randn(2, generator=gen)])
    torch.testing.assert_close(mutated - plain, noise * 0.5)


def test_chromosomes_split_separately() -> None:
    model = FlatModel(nn.Linear(1, 2), chromosomes=["weight", ""])
    with pytest.raises(StateError, match="chromosome"):  # model and algorithm must agree
        _runner(model)
    r = _runner(model, chromosomes=["weight", ""])
    params = {
        "split": [{"filter": "weight", "value": 0.0}, {"value": 1.0}],
        "ratio": [{"filter": "weight", "value": 0.0}, {"value": 0.0}],
        "angle": "segment",
    }
    recipe = {"merge_method": "splitpoint", "models": [{"model": "a"}, {"model": "b"}]}
    child = r.build({**recipe, "parameters": params})
    # weight: split 0 -> all "after" with t = 1 → B's weight; bias: split 1, t = 0 → A's bias
    np.testing.assert_allclose(child.numpy(), [0.0, 1.0, 2.0, 0.0], atol=1e-6)


def test_random_init_matches_documented_draw() -> None:
    r = _runner()
    v = r.build({"merge_method": "random_init", "parameters": {"std": 0.01}}, seed=4)
    gen = generator_for(4, 1)
    want = torch.cat([torch.randn(2, 1, generator=gen).reshape(-1), torch.randn(2, generator=gen)])
    torch.testing.assert_close(v, want * 0.01)


def test_batched_forward_equals_module_forward() -> None:
    x = torch.rand(50, 64)
    y = torch.randint(0, 10, (50,))
    task = ClassificationTask("t", x, y)
    model = FlatModel(digits_mlp())
    vecs = [model.flatten(build_mlp(seed=s)) for s in range(3)]
    runner = FlatM2N2(M2N2({"init": "scratch"}), model, {"t": task})
    batched = runner.score(vecs)
    for v, got in zip(vecs, batched, strict=True):
        m = build_mlp()
        torch.nn.utils.vector_to_parameters(v, m.parameters())
        np.testing.assert_array_equal(got["t"], task.score(m))


@pytest.fixture(scope="module")
def digits():
    data = load_digits_data()
    return image_tasks(data)


def _digits_runner(digits, opts: dict) -> FlatM2N2:
    algo = M2N2({"init": "scratch", **opts})
    return FlatM2N2(algo, FlatModel(digits_mlp()), {"digits-train": digits["train"]})


def test_short_digits_run_beats_chance(digits) -> None:
    runner = _digits_runner(digits, {"seed": 0})
    history = History()
    runner.run(600, callback=lambda r: history.record(r, digits["test"]), every=300)
    assert [row["evaluations"] for row in history.rows] == [300.0, 600.0]
    last = history.rows[-1]
    assert last["test_accuracy"] > 0.2  # chance is 0.1
    assert last["train_accuracy"] >= history.rows[0]["train_accuracy"]
    assert 0.0 < last["coverage"] <= 1.0 and 0.0 < last["entropy"] <= 1.0
    # store holds exactly the archive
    assert set(runner.store) == runner.algo.references()
    assert len(runner.store) == 20


def test_resume_mid_run_equals_uninterrupted(digits, tmp_path) -> None:
    opts = {"seed": 3, "archive_size": 6}
    full = _digits_runner(digits, opts)
    full.run(120)
    part = _digits_runner(digits, opts)
    part.run(60)
    part.save(tmp_path / "run")
    resumed = _digits_runner(digits, opts)
    resumed.load(tmp_path / "run")
    resumed.run(120)
    assert resumed.algo.refs == full.algo.refs
    np.testing.assert_array_equal(resumed.algo.scores, full.algo.scores)
    for key in full.store:
        torch.testing.assert_close(resumed.store[key], full.store[key], rtol=0, atol=0)


def test_same_seed_same_archive_and_batched_variant(digits) -> None:
    a = _digits_runner(digits, {"seed": 1, "archive_size": 5})
    b = _digits_runner(digits, {"seed": 1, "archive_size": 5})
    a.run(40)
    b.run(40)
    assert a.algo.refs == b.algo.refs
    k = _digits_runner(digits, {"seed": 1, "archive_size": 5, "batch_size": 4})
    k.run(40)
    assert k.algo.evaluations == 40 and len(k.store) == 5
    assert all(store_key(r) in k.store for r in k.algo.recipes)
