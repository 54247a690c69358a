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
