"""A run may start from fixed merge steps: a recipe file (mergekit-multi stages too) whose
output becomes a model named after the step, for the stages that search after it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import toy_problem as tp
from safetensors.torch import load_file

from shoal.errors import RecipeError
from shoal.search.runner import evolve

# two mergekit-multi stages naming the config's models by name: x = (0 + 1) / 2, then
# x = 0.25 * half + 0.75 * one = 0.875
MULTI = """\
name: half
merge_method: linear
models:
  - {model: zero, parameters: {weight: 0.5}}
  - {model: one, parameters: {weight: 0.5}}
---
merge_method: linear
models:
  - {model: half, parameters: {weight: 0.25}}
  - {model: one, parameters: {weight: 0.75}}
"""


def _config(tmp_path: Path, recipe: str = MULTI, **step: object) -> dict:
    sources = tp.write_sources(tmp_path / "src")
    (tmp_path / "multi.yaml").write_text(recipe)
    cfg = tp.toy_config(sources, algorithm=None, budget={"evaluations": 4})
    cfg["stages"] = [
        {"name": "pre", "merge": "multi.yaml", **step},
        {"name": "search", "algorithm": {"name": "toy-random", "population": 2}},
    ]
    cfg["root"] = str(tmp_path)
    return cfg


def _x(folder: Path) -> float:
    return float(load_file(str(folder / "model.safetensors"))["x"][0])


def test_a_multi_stage_recipe_is_a_fixed_first_step(tmp_path) -> None:
    result = evolve(_config(tmp_path), tmp_path / "run")
    step = tmp_path / "run" / "stages" / "pre"
    assert _x(step / "best") == pytest.approx(0.875)  # by hand, above
    # the searching stage was given the step's output as a model named after it
    state = json.loads((tmp_path / "run" / "stages" / "search" / "state.json").read_text())
    assert "pre" in state["algorithm"]["state"]["models"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["pre", "search"]
    assert summary["evaluations"] == 4 == result.summary["evaluations"]
    assert not list(step.glob(".*stages"))  # the intermediates went after the merge
    from shoal.report import write_report

    text = (write_report(tmp_path / "run") / "summary.md").read_text()
    assert "- stage pre: fixed merge of " in text and "multi.yaml" in text
    # resuming the finished run merges nothing again
    before = (step / "best" / "model.safetensors").stat().st_mtime_ns
    evolve(None, tmp_path / "run", resume=True)
    assert (step / "best" / "model.safetensors").stat().st_mtime_ns == before


def test_a_bad_step_is_refused_before_anything_runs(tmp_path) -> None:
    bad = MULTI.replace("model: one, parameters: {weight: 0.75}", "model: nowhere")
    with pytest.raises(RecipeError, match=r"stages\[0\]\.merge: .*multi.yaml: stage 2"):
        evolve(_config(tmp_path, bad), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(RecipeError, match="no budget"):
        evolve(_config(tmp_path, budget={"evaluations": 3}), tmp_path / "run")
    cfg = _config(tmp_path)
    cfg["stages"] = cfg["stages"][:1]  # nothing searches after it
    with pytest.raises(RecipeError, match="last stage must search"):
        evolve(cfg, tmp_path / "run")


def test_a_plain_recipe_is_a_step_and_a_later_step_names_it(tmp_path) -> None:
    """One-document recipes too; a step may name an earlier step's output."""
    cfg = _config(tmp_path, "merge_method: linear\nmodels:\n  - {model: one}\n")
    (tmp_path / "again.yaml").write_text(
        "merge_method: linear\nmodels:\n"
        "  - {model: pre, parameters: {weight: 0.5}}\n"
        "  - {model: zero, parameters: {weight: 0.5}}\n"
    )
    cfg["stages"].insert(1, {"name": "again", "merge": "again.yaml"})
    evolve(cfg, tmp_path / "run")
    stages = tmp_path / "run" / "stages"
    assert _x(stages / "pre" / "best") == 1.0
    assert _x(stages / "again" / "best") == pytest.approx(0.5)
