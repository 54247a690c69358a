"""Model store, candidate seeds and in-place building, without a run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import toy_problem as tp

from shoal.errors import CheckpointError, MergeError
from shoal.executors import (
    DirStore,
    MemoryStore,
    SourceMap,
    WorkerSpec,
    WorkItem,
    build_candidate,
    candidate_seed,
)
from shoal.executors.serial import SerialExecutor
from shoal.executors.worker import Worker, load_tensors


def test_candidate_seed_is_a_pure_function_and_distinct():
    seeds = {candidate_seed(7, g, i) for g in range(20) for i in range(20)}
    assert len(seeds) == 400
    assert candidate_seed(7, 3, 4) == candidate_seed(7, 3, 4) != candidate_seed(8, 3, 4)
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("kind", ["memory", "dir"])
def test_store_put_get_retain_prune(tmp_path, kind):
    store = MemoryStore(tmp_path / "s") if kind == "memory" else DirStore(tmp_path / "s")
    store.put("a", {"x": torch.tensor([1.0])})
    store.put("store:b", {"x": torch.tensor([2.0])})
    store.put("a", {"x": torch.tensor([9.0])})  # keys name content: the first stays
    assert float(store.get("store:a")["x"][0]) == 1.0 and "store:b" in store
    store.retain({"store:b"})
    store.flush()
    store.prune()
    assert store.keys() == {"b"}
    with pytest.raises(CheckpointError, match="'a'"):
        store.get("a")
    # what was flushed survives a restart (resume)
    again = MemoryStore(tmp_path / "s") if kind == "memory" else DirStore(tmp_path / "s")
    assert float(again.get("b")["x"][0]) == 2.0


@pytest.mark.parametrize("kind", ["memory", "dir"])
def test_store_keeps_a_tied_weight_once_as_checkpoints_do(tmp_path, kind):
    """A tied lm_head is stored under the embeddings' name only, as save_pretrained writes it."""
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # tied
    sd = {"embed.weight": emb.weight, "norm": torch.ones(3), "lm_head.weight": head.weight}
    sd["lone_view"] = sd["norm"][:2]  # a view of other storage, not an alias: kept
    store = MemoryStore() if kind == "memory" else DirStore(tmp_path / "s")
    store.put("m", sd)
    got = store.get("m")
    assert set(got) == {"embed.weight", "norm", "lone_view"}
    assert torch.equal(got["embed.weight"], emb.weight.detach())


@pytest.mark.parametrize("order", [("a", "store:k"), ("store:k", "a")])
def test_tied_weights_merge_across_pt_sources_and_stored_models(tmp_path, order):
    """A torch.save source (both tied names) merges with a stored child (one name)."""
    torch.manual_seed(0)
    a, child = tp.Tied(), tp.Tied()
    torch.save(a.state_dict(), tmp_path / "a.pt")
    spec = WorkerSpec(
        loader={"type": "callable", "target": "toy_problem:Tied", "options": {}},
        models={"a": str(tmp_path / "a.pt")},
        base_model=None,
        tasks=[],
    )
    worker = Worker(spec)
    worker.store.put("k", child.state_dict())
    assert (
        set(worker.sources["a"])
        == set(worker.store.get("k"))
        == {
            "embed.weight",
            "norm.weight",
            "norm.bias",
        }
    )
    recipe = {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": {"weight": 0.5}} for m in order],
    }
    model = worker.build(recipe, seed=0)
    expected = (a.embed.weight + child.embed.weight) / 2
    assert torch.allclose(model.embed.weight, expected)
    assert model.lm_head.weight is model.embed.weight


def test_memory_store_persists_only_retained_entries(tmp_path):
    store = MemoryStore(tmp_path / "s")
    for k in "abc":
        store.put(k, {"x": torch.zeros(2)})
    store.retain({"a", "c"})
    store.flush()
    assert {p.stem for p in (tmp_path / "s").glob("*.safetensors")} == {"a", "c"}
    store.retain({"c"})
    store.flush()
    store.prune()
    assert {p.stem for p in (tmp_path / "s").glob("*.safetensors")} == {"c"}


def _sources(tmp_path) -> SourceMap:
    paths = tp.write_sources(tmp_path / "src")
    return SourceMap(paths, MemoryStore(), load_tensors)


def test_build_copy_init_and_mutation(tmp_path):
    sources = _sources(tmp_path)
    model = tp.Scalar().requires_grad_(False)
    build_candidate(model, {"model": "one"}, sources, seed=0)
    assert float(model.x[0]) == 1.0
    init = {"merge_method": "random_init", "parameters": {"std": 0.5}}
    a = float(build_candidate(model, init, sources, seed=1).x[0])
    b = float(build_candidate(model, init, sources, seed=1).x[0])
    c = float(build_candidate(model, init, sources, seed=2).x[0])
    assert a == b != c
    seeded = {"merge_method": "random_init", "parameters": {"std": 0.5, "seed": 9}}
    assert float(build_candidate(model, seeded, sources, seed=1).x[0]) == float(
        build_candidate(model, seeded, sources, seed=2).x[0]
    )
    # mutation: exactly N(0, sigma^2) noise on top of the copy, from the item seed
    xs = []
    for s in range(400):
        build_candidate(model, {"model": "one", "mutation": 0.1}, sources, seed=s)
        xs.append(float(model.x[0]) - 1.0)
    assert abs(np.mean(xs)) < 0.02 and np.std(xs) == pytest.approx(0.1, rel=0.15)


def test_build_linear_merge_in_place_and_store_refs(tmp_path):
    sources = _sources(tmp_path)
    model = tp.Scalar().requires_grad_(False)
    param = model.x
    build_candidate(model, tp.linear_recipe(0.25), sources, seed=0)
    assert model.x is param and float(model.x[0]) == pytest.approx(0.25)
    sources._store.put("k", {"x": torch.tensor([0.75])})  # type: ignore[union-attr]
    build_candidate(model, {"model": "store:k"}, sources, seed=0)
    assert float(model.x[0]) == 0.75
    assert "store:k" in sources and "store:nope" not in sources and "zero" in sources
    with pytest.raises(MergeError, match="lacks tensor 'x'"):
        sources._store.put("bad", {"y": torch.tensor([1.0])})  # type: ignore[union-attr]
        build_candidate(model, {"model": "store:bad"}, sources, seed=0)


def test_worker_scores_a_failed_candidate_as_worst(tmp_path):
    paths = tp.write_sources(tmp_path / "src")
    spec = WorkerSpec(
        loader={"type": "callable", "target": "toy_problem:make_scalar", "options": {}},
        models=paths,
        base_model=None,
        tasks=[{"type": "function", "name": "toy", "target": "toy_problem:score", "size": 5}],
    )
    ex = SerialExecutor(spec)
    good, bad = ex.evaluate(
        [
            WorkItem(0, tp.linear_recipe(0.5), seed=1, keep_as="g"),
            WorkItem(1, {"model": "missing-model"}, seed=2),
        ]
    )
    assert good.error is None and good.scores["toy"] == pytest.approx(1 - abs(0.5 - tp.CENTRES))
    assert "g" in ex.worker.store
    assert bad.error is not None and "missing-model" in bad.error
    assert np.all(bad.scores["toy"] == 0.0) and bad.scores["toy"].shape == (5,)


def test_a_stored_model_merges_alike_in_memory_and_read_back_from_disk(tmp_path):
    """Regression: a splitpoint flattens model A in A's key order, so a stored model must
    list its tensors in one order in memory (serial) and read back from disk (process
    workers, Ray, a resumed run); the in-memory store kept state_dict order
    (norm.weight, norm.bias), a safetensors file reads back sorted (norm.bias, norm.weight)."""
    torch.manual_seed(0)
    mem = MemoryStore(tmp_path / "s")
    for key in ("a", "b"):
        model = tp.Tied()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        mem.put(key, model.state_dict())
    mem.retain({"a", "b"})
    mem.flush()
    stores = {
        "memory": mem,
        "dir": DirStore(tmp_path / "s"),
        "resumed": MemoryStore(tmp_path / "s"),
    }
    orders = {kind: list(store.get("a")) for kind, store in stores.items()}
    # the module's order, as the flat fast path (m2n2_flat) and the in-memory store have it
    assert (
        orders["memory"] == orders["dir"] == orders["resumed"] == list(tp.Tied().state_dict())[:3]
    )
    # 21 floats; a split at 17 falls in norm.weight in one order and in norm.bias in the other
    recipe = {
        "merge_method": "splitpoint",
        "models": [{"model": "store:a"}, {"model": "store:b"}],
        "parameters": {"angle": "segment", "ratio": 0.3, "split": 0.8},
    }
    built = {}
    for kind, store in stores.items():
        model = build_candidate(
            tp.Tied().requires_grad_(False), recipe, SourceMap({}, store, load_tensors), seed=0
        )
        built[kind] = {k: v.clone() for k, v in model.state_dict().items()}
    for kind in ("dir", "resumed"):
        for name, tensor in built["memory"].items():
            assert torch.equal(tensor, built[kind][name]), (kind, name)


def test_a_source_file_and_a_stored_copy_split_alike(tmp_path):
    """A splitpoint flattens model A in A's key order: a seed read from a safetensors
    file (names sorted: norm.bias first) must split where the same weights split when
    they come back from the store (module order: norm.weight first)."""
    from safetensors.torch import save_file

    from shoal.executors.store import distinct_tensors

    torch.manual_seed(0)
    parents = {}
    for key in ("a", "b"):
        model = tp.Tied()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        parents[key] = distinct_tensors(model.state_dict())
        save_file(
            {k: v.contiguous() for k, v in parents[key].items()}, tmp_path / f"{key}.safetensors"
        )
    spec = WorkerSpec(
        loader={"type": "callable", "target": "toy_problem:Tied", "options": {}},
        models={k: str(tmp_path / f"{k}.safetensors") for k in parents},
        base_model=None,
        tasks=[],
    )
    worker = Worker(spec)
    assert list(load_tensors(str(tmp_path / "a.safetensors")))[:2] == ["embed.weight", "norm.bias"]
    for key, tensors in parents.items():
        worker.store.put(key, tensors)
    built = {}
    for kind, (a, b) in {"files": ("a", "b"), "store": ("store:a", "store:b")}.items():
        recipe = {
            "merge_method": "splitpoint",
            "models": [{"model": a}, {"model": b}],
            # 21 floats; a split at 17 falls in norm.weight in one order, norm.bias in the other
            "parameters": {"angle": "segment", "ratio": 0.3, "split": 0.8},
        }
        model = worker.build(recipe, seed=0)
        built[kind] = {k: v.clone() for k, v in model.state_dict().items()}
    for name, tensor in built["store"].items():
        assert torch.equal(tensor, built["files"][name]), name
