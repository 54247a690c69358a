"""Multi-stage runs: each stage's best becomes a model named after the stage."""

from __future__ import annotations

import json

import toy_problem as tp
from safetensors.torch import load_file

from shoal.search.runner import evolve


def test_two_stages_second_sees_first_best(tmp_path):
    sources = tp.write_sources(tmp_path / "src")
    cfg = tp.toy_config(sources)
    del cfg["algorithm"]
    cfg["stages"] = [
        {"name": "first", "algorithm": {"name": "toy-random", "population": 4}},
        {
            "name": "second",
            "algorithm": {"name": "toy-random", "population": 2},
            "budget": {"evaluations": 4},
        },
    ]
    result = evolve(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["first", "second"]
    assert summary["evaluations"] == 12 + 4 == result.summary["evaluations"]
    # the second stage was given the first stage's best as a model
    state = json.loads((tmp_path / "run" / "stages" / "second" / "state.json").read_text())
    assert state["algorithm"]["state"]["models"] == ["first", "one", "zero"]
    first_best = tmp_path / "run" / "stages" / "first" / "best"
    assert (first_best / "model.safetensors").is_file()
    # top-level best/ is the last stage's best
    top = load_file(str(tmp_path / "run" / "best" / "model.safetensors"))["x"]
    last = load_file(str(tmp_path / "run" / "stages" / "second" / "best" / "model.safetensors"))[
        "x"
    ]
    assert float(top[0]) == float(last[0])
    # resuming a finished multi-stage run changes nothing
    again = evolve(None, tmp_path / "run", resume=True)
    assert again.summary["evaluations"] == 16


def test_a_later_stage_names_an_earlier_result_by_its_absolute_path(tmp_path, monkeypatch):
    """best/shoal_recipe.yaml must rebuild from anywhere, also with --run-dir relative."""
    import yaml

    sources = tp.write_sources(tmp_path / "src")
    stages = [
        {"name": "a", "algorithm": {"name": "toy-random"}, "budget": {"evaluations": 4}},
        {"name": "b", "algorithm": {"name": "ps", "models": ["a", "one"], "popsize": 2}},
    ]
    cfg = tp.toy_config(sources, algorithm=None, stages=stages, base_model="zero")
    cfg["budget"] = {"evaluations": 2}
    monkeypatch.chdir(tmp_path)
    evolve(cfg, "runs/x")
    stored = yaml.safe_load((tmp_path / "runs/x/stages/b/best/shoal_recipe.yaml").read_text())
    paths = [m["model"] for m in stored["models"]]
    assert paths == [str(tmp_path / "runs/x/stages/a/best"), sources["one"]]
