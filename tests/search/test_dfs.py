"""Data-flow-space evolutionary merge: slot layout, genome → path decoding, optimisation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shoal.errors import RecipeError
from shoal.merge.layer_path import parse_layer_path
from shoal.search.algorithms.base import ALGORITHMS, SearchContext
from shoal.search.algorithms.dfs import DFS

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


def test_model_a_is_scored_first_and_the_es_never_sees_it() -> None:
    dfs = DFS(*A3B3, seed=5, options={"repeats": 2, "popsize": 6})
    plain = DFS(*A3B3, seed=5, options={"repeats": 2, "popsize": 6})
    plain.start = None  # the same search without the start
    first = dfs.ask()
    assert first == [
        {
            "merge_method": "layer_path",
            "models": [{"model": "A"}, {"model": "B"}],
            "parameters": {"path": [["A", 0], ["A", 1], ["A", 2]], "scales": [1.0, 1.0, 1.0]},
        }
    ]
    # model A scores best of all; every later candidate scores less
    dfs.tell(first, [{"fit": np.ones(2)}])
    assert dfs.best is not None and dfs.best.recipe == first[0] and dfs.best.evaluation == 0
    for _ in range(3):
        got, want = dfs.ask(), plain.ask()
        assert got == want  # the ES's samples are those of the search without the start
        scores = [{"fit": np.zeros(2)} for _ in got]
        dfs.tell(got, scores)
        plain.tell(want, scores)
    assert np.array_equal(dfs.es.mean, plain.es.mean)
    assert dfs.best.recipe == first[0] and dfs.evaluations == 1 + 3 * 6
    # resumed between the start and the first generation: the start is not asked again
    again = DFS(*A3B3, seed=5, options={"repeats": 2, "popsize": 6})
    again.tell(again.ask(), [{"fit": np.ones(2)}])
    resumed = DFS(*A3B3, seed=0, options={"repeats": 2, "popsize": 6})
    resumed.load_state_dict(json.loads(json.dumps(again.state_dict())))
    fresh = DFS(*A3B3, seed=5, options={"repeats": 2, "popsize": 6})
    fresh.start = None
    assert resumed.ask() == fresh.ask()


def test_state_of_an_older_version_resumes_without_scoring_the_start() -> None:
    dfs = DFS(*A3B3, seed=2, options={"repeats": 1, "popsize": 4})
    dfs.start = None
    recipes = dfs.ask()
    dfs.tell(recipes, [_score(r) for r in recipes])
    state = dfs.state_dict()
    del state["state"]["start_scored"]  # as written before DFS scored its start
    resumed = DFS(*A3B3, seed=2, options={"repeats": 1, "popsize": 4})
    resumed.load_state_dict(state)
    nxt = resumed.ask()
    assert len(nxt) == 4 and nxt == dfs.ask()


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


# -- end to end through the run loop, on tiny Llama models built from configs ------------------
def _tiny_llama_dirs(root, names: list[str], vocab: int = 64) -> dict[str, str]:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    out = {}
    for k, name in enumerate(names):
        model = transformers.LlamaForCausalLM(cfg)
        g = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                base = 1.0 if "norm" in pname else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def next_token_probability(model, offset: int = 0, n: int = 8) -> np.ndarray:
    """Per-example score: probability of a fixed next token after a fixed prompt."""
    import torch

    ids = (torch.arange(n * 6).reshape(n, 6) * 5 + offset) % 60 + 3
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
    target = (torch.arange(n) * 7 + offset) % 64
    return logits.softmax(-1)[torch.arange(n), target].numpy()


def _tasks() -> dict:
    fn = f"{__name__}:next_token_probability"
    return {
        "fitness": [{"type": "function", "name": "fit", "target": fn, "size": 8}],
        "test": [
            {"type": "function", "name": "held", "target": fn, "size": 8, "options": {"offset": 3}}
        ],
    }


def _dfs_config(models: dict[str, str], popsize: int, evaluations: int) -> dict:
    return {
        "models": models,
        "loader": {"type": "hf-causal-lm", "model": "A"},
        "tasks": _tasks(),
        "algorithm": {"name": "dfs", "repeats": 1, "popsize": popsize},
        "budget": {"evaluations": evaluations},
        "progress": False,
    }


def test_dfs_run_end_to_end_exports_a_loadable_best(tmp_path) -> None:
    pytest.importorskip("transformers")
    from shoal.merge.layer_path import build_from_recipe, load_model
    from shoal.search.runner import evolve

    models = _tiny_llama_dirs(tmp_path, ["A", "B"])
    result = evolve(_dfs_config(models, popsize=6, evaluations=12), tmp_path / "run")
    assert result.status == "completed" and result.evaluations == 1 + 12  # model A, then 2 × 6
    best = result.best
    assert best is not None and best.recipe["merge_method"] == "layer_path"
    exported = load_model(result.run_dir / "best")
    direct = build_from_recipe(best.recipe, {n: load_model(p) for n, p in models.items()})
    assert float(np.mean(next_token_probability(exported))) == pytest.approx(best.fitness)
    assert np.allclose(next_token_probability(exported), next_token_probability(direct))


def test_models_of_other_vocabularies_stack_but_do_not_merge(tmp_path) -> None:
    """DFS takes embeddings and head from model A, so B may have another vocabulary;
    a tensor-wise merge (PS) of the same models is refused before any evaluation."""
    pytest.importorskip("transformers")
    from shoal.errors import MergeError
    from shoal.search.runner import evolve

    models = _tiny_llama_dirs(tmp_path, ["A"]) | _tiny_llama_dirs(tmp_path, ["B"], vocab=72)
    config = _dfs_config(models, popsize=4, evaluations=4)
    result = evolve(config, tmp_path / "dfs")
    assert result.status == "completed" and result.summary["failed_candidates"] == 0
    ps = {**config, "base_model": "A", "algorithm": {"name": "ps"}}
    with pytest.raises(MergeError, match=r"models\.B: tensor '\S+' has shape \[72, 32\]"):
        evolve(ps, tmp_path / "ps")
    assert not (tmp_path / "ps").exists()
    # a tensor-wise stage after DFS merges the same models: refused too
    del config["algorithm"]
    stages = {
        **config,
        "base_model": "A",
        "stages": [
            {"name": "dfs", "algorithm": {"name": "dfs", "repeats": 1, "popsize": 4}},
            {"name": "ps", "algorithm": {"name": "ps"}},
        ],
    }
    with pytest.raises(MergeError, match=r"has shape \[72, 32\]"):
        evolve(stages, tmp_path / "stages")


def test_ps_then_dfs_stages(tmp_path) -> None:
    pytest.importorskip("transformers")
    from shoal.merge.layer_path import load_model
    from shoal.search.runner import evolve

    models = _tiny_llama_dirs(tmp_path, ["base", "a", "b"])
    config = {
        "models": models,
        "base_model": "base",
        "tasks": _tasks(),
        "stages": [
            {"name": "ps", "algorithm": {"name": "ps", "popsize": 4}},
            {
                "name": "dfs",
                "algorithm": {"name": "dfs", "models": ["ps", "b"], "repeats": 1, "popsize": 4},
            },
        ],
        "budget": {"evaluations": 8},
        "progress": False,
    }
    result = evolve(config, tmp_path / "run")
    assert result.status == "completed"
    assert result.best is not None
    path = result.best.recipe["parameters"]["path"]
    assert path[0] == ["ps", 0] and path[-1] == ["ps", 2]  # PS's result is model A
    # the PS stage's best/ is the exact model it scored (DARE drops redone with its seed)
    ps = result.summary["stages"][0]["best"]
    assert ps["recipe"]["merge_method"] == "dare_ties"
    ps_model = load_model(ps["path"])
    assert float(np.mean(next_token_probability(ps_model))) == pytest.approx(ps["fitness"])
    # DFS scored its model A, PS's result, first: the chain cannot end below PS
    dfs = result.summary["stages"][1]
    assert dfs["evaluations"] == 1 + 2 * 4
    assert dfs["best"]["fitness"] >= ps["fitness"] - 1e-6
    events = (tmp_path / "run" / "stages" / "dfs" / "events.jsonl").read_text().splitlines()
    start = json.loads(events[0])
    assert start["recipe"]["parameters"]["path"] == [["ps", 0], ["ps", 1], ["ps", 2]]
    assert start["fitness"] == pytest.approx(ps["fitness"])
