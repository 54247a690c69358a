"""The run loop on the toy problem: results, stops, determinism, resume after a kill."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import toy_problem as tp
import yaml
from safetensors.torch import load_file, save_file

from shoal.errors import OutputExistsError, StateError
from shoal.merge import merge_to_disk
from shoal.search.run_folder import RunFolder
from shoal.search.runner import evolve

DETERMINISTIC = ("evaluation", "generation", "recipe", "seed", "means", "fitness", "error")


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, str]:
    return tp.write_sources(tmp_path / "src")


def _events(run: Path) -> list[dict[str, Any]]:
    return tp.run_events(run, DETERMINISTIC)


def _weight_of_one(recipe: dict[str, Any]) -> float:
    return float(recipe["models"][1]["parameters"]["weight"])


def test_run_writes_folder_and_scores_match_the_formula(tmp_path, sources):
    result = evolve(tp.toy_config(sources), tmp_path / "run")
    assert result.status == "completed" and result.evaluations == 12
    assert "evaluation budget" in result.stop_reason
    events = RunFolder(tmp_path / "run").events.read()
    assert len(events) == 12 and [e["evaluation"] for e in events] == list(range(12))
    for e in events:  # linear merge of x=0 and x=1 with weights (1-t, t) has x = t
        t = _weight_of_one(e["recipe"])
        assert e["means"]["toy"] == pytest.approx(np.mean(1 - np.abs(t - tp.CENTRES)), abs=1e-6)
    best = max(events, key=lambda e: e["fitness"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best"]["evaluation"] == best["evaluation"]
    assert summary["best"]["scores"]["test"]["toy-test"] == pytest.approx(best["fitness"], abs=1e-6)
    # best/ is a loadable checkpoint holding the best candidate's x
    x = load_file(str(tmp_path / "run" / "best" / "model.safetensors"))["x"]
    assert float(x[0]) == pytest.approx(_weight_of_one(best["recipe"]), abs=1e-6)
    # best/shoal_recipe.yaml is a recipe shoal merge rebuilds best/ from, from anywhere
    stored = tmp_path / "run" / "best" / "shoal_recipe.yaml"
    seed = summary["best"]["seed"]
    assert stored.read_text().startswith(
        f"# rebuild: shoal merge shoal_recipe.yaml OUT --seed {seed}\n"
    )
    rebuilt = merge_to_disk(stored, tmp_path / "rebuilt", seed=seed, progress=False)
    assert torch.equal(load_file(str(rebuilt / "model.safetensors"))["x"], x)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["runner"]["evaluations"] == 12 and state["algorithm"]["evaluations"] == 12


def test_same_seed_same_run_other_seed_differs(tmp_path, sources):
    evolve(tp.toy_config(sources), tmp_path / "a")
    evolve(tp.toy_config(sources), tmp_path / "b")
    evolve(tp.toy_config(sources, seed=8), tmp_path / "c")
    assert _events(tmp_path / "a") == _events(tmp_path / "b")
    assert _events(tmp_path / "a") != _events(tmp_path / "c")


def test_stops_on_target_and_wall_time(tmp_path, sources):
    r = evolve(tp.toy_config(sources, budget={"evaluations": 400, "target": 0.75}), tmp_path / "t")
    assert "target" in r.stop_reason and r.best is not None and r.best.fitness >= 0.75
    assert r.evaluations < 400
    r = evolve(tp.toy_config(sources, budget={"seconds": 1e-9}), tmp_path / "w")
    assert "wall-time" in r.stop_reason and r.evaluations == 4  # checked between batches


def test_existing_run_folder_needs_resume(tmp_path, sources):
    evolve(tp.toy_config(sources), tmp_path / "run")
    with pytest.raises(OutputExistsError, match="--resume"):
        evolve(tp.toy_config(sources), tmp_path / "run")
    with pytest.raises(StateError, match="nothing to resume"):
        evolve(None, tmp_path / "none", resume=True)


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


@pytest.mark.parametrize("keeper", [False, True])
def test_resume_after_kill_equals_uninterrupted_run(tmp_path, sources, monkeypatch, keeper):
    cfg = tp.toy_config(sources, budget={"evaluations": 20})
    cfg["checkpoint_seconds"] = 0  # a checkpoint after every batch
    if keeper:  # exercises the model store across the kill
        cfg["algorithm"] = {"name": "toy-keeper", "population": 4}
    evolve(cfg, tmp_path / "full")

    # kill after the events of batch 3 are written but before its state is saved
    original = RunFolder.write_state
    calls = {"n": 0}

    def dying(self: RunFolder, state: dict[str, Any]) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Killed
        original(self, state)

    monkeypatch.setattr(RunFolder, "write_state", dying)
    with pytest.raises(_Killed):
        evolve(cfg, tmp_path / "cut")
    monkeypatch.setattr(RunFolder, "write_state", original)
    assert len(RunFolder(tmp_path / "cut").events.read()) == 12  # one batch more than saved
    result = evolve(None, tmp_path / "cut", resume=True)
    assert result.evaluations == 20
    assert _events(tmp_path / "cut") == _events(tmp_path / "full")
    full = json.loads((tmp_path / "full" / "state.json").read_text())
    cut = json.loads((tmp_path / "cut" / "state.json").read_text())
    assert full["algorithm"] == cut["algorithm"]
    s_full = json.loads((tmp_path / "full" / "summary.json").read_text())["best"]
    s_cut = json.loads((tmp_path / "cut" / "summary.json").read_text())["best"]
    assert s_full["recipe"] == s_cut["recipe"] and s_full["scores"] == s_cut["scores"]


def test_ctrl_c_stops_after_batch_and_resumes(tmp_path, sources):
    cfg = tp.toy_config(sources, budget={"evaluations": 16})
    evolve(cfg, tmp_path / "full")
    events = _events(tmp_path / "full")
    best = max(events, key=lambda e: e["fitness"])
    # a candidate of batch 2 that is not the best (the best is scored again at the end)
    hit = next(e for e in events[4:8] if e["evaluation"] != best["evaluation"])
    first_t = _weight_of_one(hit["recipe"])
    cfg_int = json.loads(json.dumps(cfg))
    cfg_int["tasks"]["fitness"] = tp.interrupting_fitness(first_t)
    result = evolve(cfg_int, tmp_path / "int")
    assert result.status == "interrupted" and result.evaluations == 8  # batch 2 finished
    assert not (tmp_path / "int" / "summary.json").exists()
    resumed = evolve(None, tmp_path / "int", resume=True)
    assert resumed.status == "completed" and resumed.evaluations == 16
    # the interrupt flag would fire again on resume only if t repeats; it does not
    assert _events(tmp_path / "int") == _events(tmp_path / "full")


def test_baselines_score_sources_and_named_recipes(tmp_path, sources):
    half = {
        "merge_method": "linear",
        "models": [
            {"model": "zero", "parameters": {"weight": 0.5}},
            {"model": "one", "parameters": {"weight": 0.5}},
        ],
    }
    evolve(tp.toy_config(sources, baselines={"half": half}), tmp_path / "run")
    baselines = json.loads((tmp_path / "run" / "summary.json").read_text())["baselines"]
    assert set(baselines) == {"zero", "one", "half"}
    for name, x in (("zero", 0.0), ("one", 1.0), ("half", 0.5)):  # score = mean 1 - |x - c|
        expected = np.mean(np.clip(1 - np.abs(x - tp.CENTRES), 0, 1))
        assert baselines[name]["test"]["toy-test"] == pytest.approx(expected, abs=1e-6)


def test_bad_baseline_recipe_fails_before_the_search(tmp_path, sources):
    from shoal.errors import RecipeError

    typo = {"merge_method": "linear", "models": [{"model": "zer0", "parameters": {"weight": 1}}]}
    typo_key = r"baselines\.typo\.models\[0\]\.model: unknown model 'zer0'"
    with pytest.raises(RecipeError, match=typo_key):
        evolve(tp.toy_config(sources, baselines={"typo": typo}), tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing written
    bad = {"merge_method": "lineer", "models": [{"model": "zero"}]}
    with pytest.raises(RecipeError, match=r"baselines\.bad"):
        evolve(tp.toy_config(sources, baselines={"bad": bad}), tmp_path / "run2")


def test_stored_recipe_names_paths_and_says_what_merge_cannot_rebuild() -> None:
    from shoal.search.export import stored_recipe

    models = {"base": "/m/base", "a": "/m/a", "ps": "/run/stages/ps/best"}
    recipe = {
        "merge_method": "dare_ties",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "ps"}],
    }
    text = stored_recipe(recipe, 11, models)
    assert text.splitlines()[0] == "# rebuild: shoal merge shoal_recipe.yaml OUT --seed 11"
    body = yaml.safe_load(text)
    assert body["base_model"] == "/m/base"
    assert [m["model"] for m in body["models"]] == ["/m/a", "/run/stages/ps/best"]
    assert recipe["base_model"] == "base"  # the run's own recipe is left as it was
    child = {"merge_method": "splitpoint", "models": [{"model": "store:ab12"}, {"model": "a"}]}
    assert stored_recipe(child, 3, models).startswith("# shoal merge cannot rebuild this: a parent")
    mutated = {"merge_method": "splitpoint", "models": [{"model": "a"}], "mutation": {"std": 0.1}}
    assert stored_recipe(mutated, 3, models).startswith("# shoal merge cannot rebuild this: it is")
    drawn = {"merge_method": "random_init", "parameters": {"std": 0.01}}
    assert stored_recipe(drawn, 3, models).startswith("# shoal merge cannot rebuild this: it is")
    source = stored_recipe({"model": "a"}, 3, models)
    assert source.startswith("# a source model itself: /m/a")
    cqd = {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 1.0}}],
        "svd_mutation": {"expert": "a", "base": "base", "w_max": 0.1},
    }
    body = yaml.safe_load(stored_recipe(cqd, 3, models))
    assert body["svd_mutation"] == {"expert": "/m/a", "base": "/m/base", "w_max": 0.1}
    path = {"merge_method": "layer_path", "models": [{"model": "a"}], "parameters": {}}
    text = stored_recipe(path, 0, models)
    assert "shoal.load_model" in text and yaml.safe_load(text)["models"] == [{"model": "a"}]


def test_a_baseline_may_name_a_model_by_its_path(tmp_path, sources):
    """A checkpoint outside models: is scored as a baseline, as the checks allow."""
    save_file({"x": torch.tensor([0.25])}, str(tmp_path / "quarter.safetensors"))
    baselines = {"quarter": {"model": str(tmp_path / "quarter.safetensors")}}
    evolve(tp.toy_config(sources, baselines=baselines), tmp_path / "run")
    scored = json.loads((tmp_path / "run" / "summary.json").read_text())["baselines"]
    expected = np.mean(np.clip(1 - np.abs(0.25 - tp.CENTRES), 0, 1))
    assert scored["quarter"]["test"]["toy-test"] == pytest.approx(expected, abs=1e-6)
