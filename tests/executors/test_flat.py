"""The flat-vector build of small models: children by hand, and equal to the general build."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from shoal.executors import flat as flat_module
from shoal.executors.build import SourceMap, build_candidate, generator_for
from shoal.executors.flat import FlatModel, FlatVector
from shoal.executors.work import WorkerSpec
from shoal.executors.worker import Worker
from shoal.testbed.images import build_mlp

A = torch.tensor([1.0, 0.0, 2.0, 0.0])
B = torch.tensor([0.0, 1.0, 1.0, 2.0])


def _np_slerp(a: np.ndarray, b: np.ndarray, t: float, cos: float) -> np.ndarray:
    om = math.acos(cos)
    return (math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)


def _tiny() -> FlatModel:
    flat = FlatModel.of(nn.Linear(1, 2))  # weight (2, 1) then bias (2,): n = 4
    assert flat is not None
    return flat


def _child(split, ratio, angle: str = "segment", seed: int = 0, **extra) -> torch.Tensor:
    recipe = {
        "merge_method": "splitpoint",
        "models": [{"model": "a"}, {"model": "b"}],
        "parameters": {"split": split, "ratio": ratio, "angle": angle},
        **extra,
    }
    assert FlatModel.handles(recipe)
    return _tiny().build(recipe, seed, {"a": FlatVector(A), "b": FlatVector(B)}.__getitem__)


def test_splitpoint_segment_angle_by_hand() -> None:
    child = _child(0.5, 0.25)
    a, b = A.numpy().astype(float), B.numpy().astype(float)
    # first half: [1,0] vs [0,1], 90°, t = 0.25; second half: [2,0] vs [1,2], t = 0.75
    first = [math.cos(math.pi / 8), math.sin(math.pi / 8)]
    second = _np_slerp(a[2:], b[2:], 0.75, (2 * 1) / (2 * math.sqrt(5)))
    np.testing.assert_allclose(child.numpy(), [*first, *second], rtol=1e-6)


def test_splitpoint_global_angle_and_extremes() -> None:
    a, b = A.numpy().astype(float), B.numpy().astype(float)
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    child = _child(0.25, 0.6, "global")
    want = np.concatenate([_np_slerp(a, b, 0.6, cos)[:1], _np_slerp(a, b, 0.4, cos)[1:]])
    np.testing.assert_allclose(child.numpy(), want, rtol=1e-6)
    # split 1: everything before, t = ratio, so ratio 0 gives A; split 0: t = 1 - ratio → B
    np.testing.assert_allclose(_child(1.0, 0.0, "global").numpy(), a, atol=1e-7)
    np.testing.assert_allclose(_child(0.0, 0.0, "global").numpy(), b, atol=1e-6)


def test_mutation_is_the_candidates_seeded_gaussian() -> None:
    plain = _child(0.5, 0.3)
    mutated = _child(0.5, 0.3, seed=9, mutation=0.5)
    gen = generator_for(9, 2)  # stream 2 of the candidate seed, tensor by tensor
    noise = torch.cat([torch.randn(2, 1, generator=gen).reshape(-1), torch.randn(2, generator=gen)])
    torch.testing.assert_close(mutated - plain, noise * 0.5)


def test_chromosomes_split_separately() -> None:
    params = {
        "split": [{"filter": "weight", "value": 0.0}, {"value": 1.0}],
        "ratio": [{"filter": "weight", "value": 0.0}, {"value": 0.0}],
        "angle": "segment",
    }
    child = _child(params["split"], params["ratio"])
    # weight: split 0, all "after" with t = 1 → B's weight; bias: split 1, t = 0 → A's bias
    np.testing.assert_allclose(child.numpy(), [0.0, 1.0, 2.0, 0.0], atol=1e-6)


def test_random_init_is_the_documented_draw() -> None:
    v = _tiny().build({"merge_method": "random_init", "parameters": {"std": 0.01}}, 4, {}.get)
    gen = generator_for(4, 1)
    want = torch.cat([torch.randn(2, 1, generator=gen).reshape(-1), torch.randn(2, generator=gen)])
    torch.testing.assert_close(v, want * 0.01)


def test_only_plain_small_float32_models_qualify(monkeypatch) -> None:
    assert FlatModel.of(nn.Linear(3, 2)) is not None
    assert FlatModel.of(nn.BatchNorm1d(3)) is None  # buffers in the state dict
    assert FlatModel.of(nn.Linear(3, 2).double()) is None
    tied = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 4, bias=False))
    tied[1].weight = tied[0].weight
    assert FlatModel.of(tied) is None  # one tensor under two names
    monkeypatch.setattr(flat_module, "MAX_PARAMETERS", 7)
    assert FlatModel.of(nn.Linear(3, 2)) is None  # 8 parameters


@pytest.mark.parametrize(
    "recipe",
    [
        {"model": "b"},
        {"model": "a", "mutation": 0.02},
        {"merge_method": "random_init", "parameters": {"std": 0.05, "member": 3}},
        {"merge_method": "random_init", "parameters": {"std": 0.05, "seed": 11}, "mutation": 0.1},
        {
            "merge_method": "splitpoint",
            "models": [{"model": "a"}, {"model": "b"}],
            "parameters": {"split": 0.37, "ratio": 0.81, "angle": "segment"},
            "mutation": 0.01,
        },
        {
            "merge_method": "splitpoint",
            "models": [{"model": "b"}, {"model": "a"}],
            "parameters": {"split": 0.6, "ratio": 0.2, "angle": "global"},
        },
        {
            "merge_method": "splitpoint",
            "models": [{"model": "a"}, {"model": "b"}],
            "parameters": {
                "split": [{"filter": "0.", "value": 0.3}, {"value": 0.9}],
                "ratio": [{"filter": "0.", "value": 0.7}, {"value": 0.4}],
                "angle": "segment",
            },
        },
    ],
    ids=["model", "model+mutation", "init", "init+seed+mutation", "split", "global", "chromo"],
)
def test_flat_build_equals_the_general_build(recipe) -> None:
    """Both builds give the same tensors bit for bit: a run is the same on either path."""
    sources = {
        name: {k: v.detach().clone() for k, v in build_mlp(seed=s).state_dict().items()}
        for name, s in (("a", 1), ("b", 2))
    }
    general = build_mlp()
    source_map = SourceMap({"a": "a", "b": "b"}, None, sources.__getitem__)
    build_candidate(general, recipe, source_map, seed=1234)
    fast = build_mlp()
    flat = FlatModel.of(fast)
    assert flat is not None and FlatModel.handles(recipe)
    vec = flat.build(recipe, 1234, lambda ref: flat.vector(sources[ref]))
    assert vec is not None  # built into the module's parameters
    for (name, want), got in zip(
        general.state_dict().items(), fast.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_a_child_is_built_into_the_modules_parameters() -> None:
    """build() writes the module's own buffer (no copy to load); ``None`` leaves it as it was."""
    module = nn.Linear(1, 2)
    flat = FlatModel.of(module)
    assert flat is not None
    recipe = {"merge_method": "splitpoint", "models": TWO, "parameters": {"split": 0.5}}
    recipe["parameters"]["ratio"] = 0.25
    parents = {"a": FlatVector(A), "b": FlatVector(B)}
    vec = flat.build({**recipe, "mutation": 0.1}, 3, parents.__getitem__)
    assert vec is not None
    assert vec.data_ptr() == module.weight.data_ptr()  # the parameters' own memory
    got = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    torch.testing.assert_close(got, vec, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in flat.tensors.values()]), vec)
    before = got.clone()
    assert flat.build(recipe, 3, {"a": FlatVector(A), "b": None}.__getitem__) is None
    after = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_other_recipes_take_the_general_path() -> None:
    assert not FlatModel.handles({"merge_method": "linear", "models": [{"model": "a"}]})
    assert not FlatModel.handles({"merge_method": "layer_path", "models": []})
    odd = {"split": [{"filter": "0.", "value": 0.3}], "ratio": [{"value": 0.1}]}
    two = [{"model": "a"}, {"model": "b"}]
    # filters that differ, or no default entry: the general build says what is wrong
    assert not FlatModel.handles({"merge_method": "splitpoint", "models": two, "parameters": odd})
    extra = {"split": 0.5, "ratio": 0.5, "t": 0.3}
    assert not FlatModel.handles({"merge_method": "splitpoint", "models": two, "parameters": extra})


def test_a_model_that_is_not_the_modules_float32_tensors_is_no_vector() -> None:
    """The general build then merges it (rounding to its dtype) or says what does not fit."""
    flat = _tiny()
    weight, bias = torch.zeros(2, 1), torch.zeros(2)
    assert flat.vector({"weight": weight, "bias": bias}) is not None
    assert flat.vector({"weight": weight}) is None  # a tensor missing
    assert flat.vector({"weight": weight, "bias": torch.zeros(3)}) is None  # a shape
    assert flat.vector({"weight": weight, "bias": bias, "extra": bias}) is None
    assert flat.vector({"weight": weight.half(), "bias": bias.half()}) is None
    recipe = {"merge_method": "splitpoint", "models": [{"model": "a"}, {"model": "b"}]}
    recipe["parameters"] = {"split": 0.5, "ratio": 0.5}
    assert _tiny().build(recipe, 0, {"a": FlatVector(A), "b": None}.__getitem__) is None


TWO = [{"model": "a"}, {"model": "b"}]
SPLIT = {"merge_method": "splitpoint", "models": TWO}


def _chromo(*entries: dict) -> list[dict]:
    return [dict(e) for e in entries]


ODD_RECIPES = {
    "filter-null": {
        **SPLIT,
        "parameters": {
            "split": _chromo(
                {"filter": "0.", "value": 0.3}, {"filter": None, "value": 0.5}, {"value": 0.9}
            ),
            "ratio": _chromo(
                {"filter": "0.", "value": 0.3}, {"filter": None, "value": 0.5}, {"value": 0.9}
            ),
        },
    },
    "split-1.5": {**SPLIT, "parameters": {"split": 1.5, "ratio": 0.3}},
    "ratio-negative": {**SPLIT, "parameters": {"split": 0.5, "ratio": -0.2}},
    "split-true": {**SPLIT, "parameters": {"split": True, "ratio": 0.3}},
    "split-nan": {**SPLIT, "parameters": {"split": float("nan"), "ratio": 0.3}},
    "entry-key": {
        **SPLIT,
        "models": [{"model": "a", "foo": 1}, {"model": "b"}],
        "parameters": {"split": 0.5, "ratio": 0.3},
    },
    "models-as-strings": {
        **SPLIT,
        "models": ["a", "b"],
        "parameters": {"split": 0.5, "ratio": 0.3},
    },
    "angle": {**SPLIT, "parameters": {"split": 0.5, "ratio": 0.3, "angle": "sideways"}},
    "unknown-model": {
        **SPLIT,
        "models": [{"model": "a"}, {"model": "zz"}],
        "parameters": {"split": 0.5, "ratio": 0.3},
    },
    "half-sources": {
        **SPLIT,
        "models": [{"model": "a"}, {"model": "h"}],
        "parameters": {"split": 0.5, "ratio": 0.3},
    },
    "extra-tensor": {"model": "x"},
    "plain": {**SPLIT, "parameters": {"split": 0.4, "ratio": 0.7}, "mutation": 0.01},
}


def _worker(tmp_path: Path) -> Worker:
    from safetensors.torch import save_file

    paths = {}
    for name, seed, extra in (
        ("a", 1, {}),
        ("b", 2, {}),
        ("h", 3, {}),
        ("x", 4, {"extra": torch.ones(2)}),
    ):
        tensors = {k: v.detach().clone() for k, v in build_mlp(seed=seed).state_dict().items()}
        if name == "h":
            tensors = {k: v.half() for k, v in tensors.items()}
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_file({**tensors, **extra}, paths[name])
    spec = WorkerSpec(
        loader={"type": "callable", "target": "shoal.testbed.images:digits_mlp"},
        models=paths,
        base_model=None,
        tasks=[],
    )
    return Worker(spec)


def _outcome(worker: Worker, recipe: dict) -> list[torch.Tensor] | str:
    try:
        model = worker.build(recipe, 77)
    except Exception as exc:  # the general build's error is the expected outcome
        return f"{type(exc).__name__}: {exc}"
    return [t.clone() for t in model.state_dict().values()]


@pytest.mark.parametrize("name", list(ODD_RECIPES))
def test_a_worker_builds_every_recipe_as_the_general_build_does(
    tmp_path, monkeypatch, name
) -> None:
    """Same tensors or the same error, whether the flat build is on or off (review finding:
    odd recipes were built differently, or built where the general build refuses)."""
    recipe = ODD_RECIPES[name]
    flat_on = _outcome(_worker(tmp_path), recipe)
    monkeypatch.setattr(flat_module, "MAX_PARAMETERS", 0)
    general = _worker(tmp_path)
    assert general.flat is None
    want = _outcome(general, recipe)
    if isinstance(want, str):
        assert flat_on == want
    else:
        assert not isinstance(flat_on, str), flat_on
        for got, expected in zip(flat_on, want, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_kept_child_is_not_changed_by_the_next_build(tmp_path) -> None:
    """A flat child lives in the module's buffer until the next build: the store must keep
    a copy of it, not the views the worker hands over."""
    from shoal.executors.work import WorkItem

    worker = _worker(tmp_path)
    assert worker.flat is not None
    first = {**SPLIT, "parameters": {"split": 0.4, "ratio": 0.7}}
    second = {**SPLIT, "parameters": {"split": 0.8, "ratio": 0.1}, "mutation": 0.01}
    assert worker.evaluate(WorkItem(0, first, seed=5, keep_as="first")).error is None
    kept = {k: v.clone() for k, v in worker.store.get("first").items()}
    assert worker.evaluate(WorkItem(1, second, seed=6)).error is None
    want = _outcome(_worker(tmp_path), first)  # the same child built by a fresh worker
    assert not isinstance(want, str)
    for got, again, expected in zip(
        kept.values(), worker.store.get("first").values(), want, strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_a_small_model_starts_on_one_thread_and_the_count_is_given_back(
    tmp_path, monkeypatch
) -> None:
    """Two threads that wait for each other on a busy host ran the digits demo 18x slower:
    a serial worker starts on one and tries two only by timing (executors/threads.py)."""
    from shoal.executors import make_executor, threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)

    spec = WorkerSpec(
        loader={"type": "callable", "target": "shoal.testbed.images:digits_mlp"},
        models={},
        base_model=None,
        tasks=[],
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with make_executor("serial", spec) as executor:
            assert torch.get_num_threads() == 1
            assert executor.worker.threads.counts == (1, 2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_parents_vector_is_kept_while_the_store_holds_the_same_tensors(
    tmp_path, monkeypatch
) -> None:
    """The worker makes a model's flat vector once and hands it out again while the
    sources give the same tensors; other tensors under the ref get a new vector, and the
    kept vectors stay within VECTOR_CACHE_BYTES."""
    from shoal.executors import worker as worker_module

    w = _worker(tmp_path)
    first = build_mlp(seed=1).state_dict()
    w.store.put("k1", first)
    v1 = w._vector("store:k1")
    assert v1 is not None and w._vector("store:k1") is v1
    torch.testing.assert_close(v1.f32, torch.cat([t.reshape(-1) for t in first.values()]))
    torch.testing.assert_close(v1.f64, v1.f32.double(), rtol=0, atol=0)
    # the store drops k1 and later holds other tensors under it: a new vector
    w.store.retain([])
    second = build_mlp(seed=2).state_dict()
    w.store.put("k1", second)
    v2 = w._vector("store:k1")
    assert v2 is not v1
    torch.testing.assert_close(v2.f32, torch.cat([t.reshape(-1) for t in second.values()]))
    # room for two: the least recently used goes
    monkeypatch.setattr(worker_module, "VECTOR_CACHE_BYTES", 2 * 16 * 19_210)
    w = _worker(tmp_path)
    for k in ("a", "b", "c"):
        w.store.put(k, build_mlp(seed=3).state_dict())
    va = w._vector("store:a")
    w._vector("store:b")
    assert w._vector("store:a") is va  # a used last
    w._vector("store:c")  # b goes
    assert list(w._vectors) == ["store:a", "store:c"]
