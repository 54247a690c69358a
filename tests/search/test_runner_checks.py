"""Checks before the run folder is written, and a folder left as it was on an early error.

House rule: a user mistake is one line naming the file and the key, exit code 2; a run that
fails before its first batch is saved leaves its folder as it was, so the corrected config
runs with the same command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import toy_problem as tp
import yaml
from safetensors.torch import save_file

from shoal.errors import CheckpointError, MergeError, OutputExistsError, RecipeError, TaskError
from shoal.executors.worker import Worker
from shoal.search.run_folder import RunFolder
from shoal.search.runner import evolve


@pytest.fixture
def no_evaluation(monkeypatch) -> None:
    """Fail the test if any candidate is evaluated."""

    def boom(self: Worker, item: Any) -> Any:
        raise AssertionError("a candidate was evaluated before the config was checked")

    monkeypatch.setattr(Worker, "evaluate", boom)


_PS = {"base_model": "zero"}  # PS merges task vectors from a base


@pytest.mark.parametrize(
    ("change", "sets", "needle"),
    [
        ({"algorithm": {"name": "toy-randum"}}, [], "algorithm.name: unknown algorithm"),
        ({}, ["algorithm.popsize=3"], "algorithm.popsize: unknown option"),
        ({}, ["algorithm.population=0"], "algorithm.population: Input should be greater"),
        ({}, ["tasks.fitness.0.target=nowhere:f"], "tasks.fitness[0]"),
        ({}, ["executor.device=gpu"], "executor.device: 'gpu' is not a torch device"),
        ({}, ["stages=[]"], "stages: List should have at least 1 item"),
        ({}, ["loader.target=json:dumps"], "loader.target 'json:dumps': dumps() missing"),
        (_PS | {"algorithm": {"name": "ps", "x0": 5}}, [], "x0 5.0 lies outside weight_range"),
        (
            _PS | {"algorithm": {"name": "ps", "weight_range": [1, 0]}},
            [],
            "weight_range [1.0, 0.0]: the lower bound must be below",
        ),
        (
            _PS | {"algorithm": {"name": "ps", "cma_options": {"bogus": 1}}},
            [],
            "algorithm: cma_options: unknown pycma option(s) bogus",
        ),
        ({"algorithm": {"name": "m2n2", "seed": -5}}, [], "algorithm.seed: Input should be"),
    ],
)
def test_bad_config_leaves_no_folder_and_the_fixed_one_runs_in_it(
    shoal_cli, tmp_path, change, sets, needle
):
    sources = tp.write_sources(tmp_path / "src")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tp.toy_config(sources, **change)))
    args = ["evolve", "cfg.yaml", "--run-dir", "runs/x", "--no-progress"]
    sets_args = [a for s in sets for a in ("--set", s)]
    code, _, err = shoal_cli([*args, *sets_args], tmp_path)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: cfg.yaml: ") and needle in err
    assert not (tmp_path / "runs").exists()  # not even the parent folder
    cfg.write_text(yaml.safe_dump(tp.toy_config(sources, budget={"evaluations": 4})))
    code, out, err = shoal_cli(args, tmp_path)
    assert code == 0, err
    assert "4 evaluations" in out


def test_an_existing_folder_is_left_as_it_was(shoal_cli, tmp_path):
    sources = tp.write_sources(tmp_path / "src")
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tp.toy_config(sources, algorithm={"name": "pss"})))
    args = ["evolve", "cfg.yaml", "--run-dir", "runs/x", "--no-progress"]
    code, _, err = shoal_cli(args, tmp_path)
    assert code == 2 and "unknown algorithm 'pss'" in err
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    cfg.write_text(yaml.safe_dump(tp.toy_config(sources, budget={"evaluations": 4})))
    code, _, err = shoal_cli(args, tmp_path)
    assert code == 0, err
    assert (run / "notes.txt").read_text() == "mine" and (run / "summary.json").is_file()


def failing_score(model: Any) -> Any:
    """A task every candidate fails (as with NaN weights, found only by building one)."""
    raise ValueError("no candidate scores")


FOREIGN: list[Path] = []


def failing_score_while_others_write(model: Any) -> Any:
    """As :func:`failing_score`, while someone else writes into the run's folder."""
    for path in FOREIGN:
        path.write_text("not the run's")
    raise ValueError("no candidate scores")


def test_a_run_failing_in_its_first_batch_removes_what_it_wrote(tmp_path):
    sources = tp.write_sources(tmp_path / "src")
    cfg = tp.toy_config(sources)
    cfg["tasks"]["fitness"][0]["target"] = "test_runner_checks:failing_score"
    with pytest.raises(TaskError, match="every candidate of the first batch failed"):
        evolve(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    evolve(tp.toy_config(sources, budget={"evaluations": 4}), tmp_path / "run")
    assert (tmp_path / "run" / "summary.json").is_file()


def test_undoing_a_failed_run_keeps_files_it_did_not_write(tmp_path, monkeypatch):
    sources = tp.write_sources(tmp_path / "src")
    cfg = tp.toy_config(sources)
    cfg["tasks"]["fitness"][0]["target"] = "test_runner_checks:failing_score_while_others_write"
    monkeypatch.setattr(sys.modules[__name__], "FOREIGN", [tmp_path / "run" / "log.txt"])
    with pytest.raises(TaskError, match="every candidate of the first batch failed"):
        evolve(cfg, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["log.txt"]


def _truncate(path: str, keep: int = 20) -> None:
    Path(path).write_bytes(Path(path).read_bytes()[:keep])


@pytest.mark.usefixtures("no_evaluation")
def test_truncated_model_is_named_by_its_key_before_any_evaluation(tmp_path):
    sources = tp.write_sources(tmp_path / "src")
    _truncate(sources["one"])
    with pytest.raises(CheckpointError, match=r"^config: models\.one: .*one\.safetensors"):
        evolve(tp.toy_config(sources), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # through a file: the message names the file first
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tp.toy_config(sources)))
    with pytest.raises(CheckpointError, match=r"^\S*cfg\.yaml: models\.one: .*one\.safetensors"):
        evolve(tmp_path / "cfg.yaml", tmp_path / "run")


@pytest.mark.usefixtures("no_evaluation")
def test_missing_model_and_shape_mismatch_are_named_before_any_evaluation(tmp_path):
    sources = tp.write_sources(tmp_path / "src")
    missing = {**sources, "one": str(tmp_path / "gone.safetensors")}
    with pytest.raises(CheckpointError, match=r"models\.one: .*gone\.safetensors"):
        evolve(tp.toy_config(missing), tmp_path / "run")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "wide.safetensors"))
    wide = {**sources, "one": str(tmp_path / "wide.safetensors")}
    shapes = r"models\.(one|zero): tensor 'x' has shape \[\d\] in \S+, but \[\d\] in models\."
    with pytest.raises(MergeError, match=shapes):
        evolve(tp.toy_config(wide), tmp_path / "run")
    # the reference (the first model, "one" once the mapping is loaded) has a weight
    # another lacks
    save_file({"x": torch.ones(1), "y.weight": torch.zeros(1)}, str(tmp_path / "m.safetensors"))
    more = {"one": str(tmp_path / "m.safetensors"), "zero": sources["zero"]}
    gap = r"models\.zero: tensor 'y\.weight' missing from \S+zero\.safetensors"
    with pytest.raises(MergeError, match=gap):
        evolve(tp.toy_config(more), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.usefixtures("no_evaluation")
def test_extra_tensors_of_other_models_or_baselines_are_no_gap(tmp_path):
    """A saved buffer (inv_freq) or a baseline's own tensors: the worker leaves them out."""
    sources = tp.write_sources(tmp_path / "src")
    extra = {"x": torch.ones(1), "rotary_emb.inv_freq": torch.ones(2), "z.weight": torch.ones(1)}
    save_file(extra, sources["zero"])  # not the reference
    save_file({"x": torch.zeros(1), "w.weight": torch.ones(3)}, str(tmp_path / "wide.safetensors"))
    cfg = tp.toy_config(sources, baselines={"wide": {"model": str(tmp_path / "wide.safetensors")}})
    with pytest.raises(AssertionError, match="a candidate was evaluated"):  # checks passed
        evolve(cfg, tmp_path / "run")


@pytest.mark.usefixtures("no_evaluation")
@pytest.mark.parametrize(("tie", "refused"), [(None, False), (True, False), (False, True)])
def test_a_head_left_out_is_a_gap_only_when_untied(tmp_path, tie, refused):
    """save_pretrained writes a tied head once; an untied one must be there."""
    sources = tp.write_sources(tmp_path / "src")
    folder = tmp_path / "headless"
    folder.mkdir()
    save_file({"x": torch.zeros(1)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps({} if tie is None else {"tie_word_embeddings": tie})
    )
    save_file({"x": torch.ones(1), "lm_head.weight": torch.ones(1)}, sources["one"])
    cfg = tp.toy_config({**sources, "zero": str(folder)})
    if refused:
        with pytest.raises(MergeError, match=r"models\.zero: tensor 'lm_head\.weight' missing"):
            evolve(cfg, tmp_path / "run")
    else:  # the checks pass; the fixture then stops the run at its first evaluation
        with pytest.raises(AssertionError, match="a candidate was evaluated"):
            evolve(cfg, tmp_path / "run")


@pytest.mark.usefixtures("no_evaluation")
def test_a_broken_model_only_a_baseline_names_fails_before_the_search(tmp_path):
    sources = tp.write_sources(tmp_path / "src")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(Path(sources["one"]).read_bytes()[:20])
    baselines = {"other": {"model": str(broken)}}
    with pytest.raises(CheckpointError, match=r"baselines\.other\.model: .*broken\.safetensors"):
        evolve(tp.toy_config(sources, baselines=baselines), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.usefixtures("no_evaluation")
def test_unknown_loader_model_names_the_known_ones(tmp_path):
    sources = tp.write_sources(tmp_path / "src")
    loader = {"type": "hf-causal-lm", "model": "nope"}
    with pytest.raises(
        RecipeError, match=r"loader\.model: unknown model 'nope' \(known: one, zero"
    ):
        evolve(tp.toy_config(sources, loader=loader), tmp_path / "run")
    loader = {"type": "hf-causal-lm", "model": "zero"}
    with pytest.raises(RecipeError, match=r"loader\.model: .*zero\.safetensors is not a Hugging"):
        evolve(tp.toy_config(sources, loader=loader), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _fake_testbed(root: Path, skills: list[str]) -> Path:
    """Just enough of a testbed on disk for its tasks to be opened (no models to run)."""
    models = {"base": {"path": "base"}} | {f"expert-{s}": {"path": f"expert-{s}"} for s in skills}
    for entry in models.values():
        (root / entry["path"]).mkdir(parents=True)
        (root / entry["path"] / "config.json").write_text("{}")
    meta = {"format_version": 1, "skills": skills, "models": models}
    (root / "testbed.json").write_text(json.dumps(meta))
    return root


@pytest.mark.usefixtures("no_evaluation")
def test_unknown_testbed_skill_of_a_test_task_is_found_before_the_search(tmp_path):
    sources = tp.write_sources(tmp_path / "src")
    _fake_testbed(tmp_path / "tb", ["gcd", "spell_backward"])
    cfg = tp.toy_config(sources)
    cfg["tasks"]["test"] = [{"type": "testbed", "dir": str(tmp_path / "tb"), "skill": "gdc"}]
    with pytest.raises(TaskError, match=r"tasks\.test\[0\]: .*no skill 'gdc'"):
        evolve(cfg, tmp_path / "run")
    cfg["tasks"]["test"] = [{"type": "testbed", "dir": str(tmp_path / "nowhere"), "skill": "gcd"}]
    with pytest.raises(TaskError, match=r"tasks\.test\[0\]: .*nowhere"):
        evolve(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_two_tasks_of_one_name_and_a_later_stage_option_are_named(tmp_path):
    sources = tp.write_sources(tmp_path / "src")
    cfg = tp.toy_config(sources)
    cfg["tasks"]["test"][0]["name"] = "toy"
    with pytest.raises(TaskError, match=r"tasks\.test\[0\]: two tasks are named 'toy'"):
        evolve(cfg, tmp_path / "run")
    stages = [
        {"name": "a", "algorithm": {"name": "toy-random"}},
        {"name": "b", "algorithm": {"name": "toy-random", "population": -1}},
    ]
    cfg = tp.toy_config(sources, algorithm=None, stages=stages)
    with pytest.raises(RecipeError, match=r"stages\[1\]\.algorithm\.population"):
        evolve(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_checks_and_context_build_a_callable_model_once(tmp_path, monkeypatch):
    """The run's checks and the algorithm's context share one build of the resident
    model; the serial worker builds its own: two in all, as before the checks existed."""
    built = []
    make = tp.make_scalar

    def counted(*args: Any, **kwargs: Any) -> Any:
        built.append(1)
        return make(*args, **kwargs)

    monkeypatch.setattr(tp, "make_scalar", counted)
    sources = tp.write_sources(tmp_path / "src")
    evolve(tp.toy_config(sources, budget={"evaluations": 4}), tmp_path / "run")
    assert len(built) == 2


def _write_nan(path: str) -> None:
    save_file({"x": torch.tensor([float("nan")])}, path)


def test_nan_weights_in_a_source_stop_the_run_naming_its_key(tmp_path):
    sources = tp.write_sources(tmp_path / "src")
    _write_nan(sources["one"])
    # named as the pre-run check names what it finds: the config (here a dict), then the key
    with pytest.raises(
        CheckpointError, match=r"^config: models\.one: .*one\.safetensors: tensor 'x'"
    ):
        evolve(tp.toy_config(sources), tmp_path / "run")
    assert not (tmp_path / "run").exists()


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def test_a_source_broken_before_a_resume_stops_it_and_the_fixed_one_ends_as_one_run(
    tmp_path, monkeypatch
):
    """Scoring candidates 0 for a broken source would steer the search; it stops instead."""
    sources = tp.write_sources(tmp_path / "src")
    cfg = tp.toy_config(sources, budget={"evaluations": 12})
    cfg["checkpoint_seconds"] = 0  # a checkpoint after every batch
    evolve(cfg, tmp_path / "whole")
    original = RunFolder.write_state
    calls = {"n": 0}

    def dying(self: RunFolder, state: dict[str, Any]) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Killed
        original(self, state)

    monkeypatch.setattr(RunFolder, "write_state", dying)
    with pytest.raises(_Killed):
        evolve(cfg, tmp_path / "run")
    monkeypatch.setattr(RunFolder, "write_state", original)
    good = Path(sources["one"]).read_bytes()
    _write_nan(sources["one"])
    with pytest.raises(CheckpointError, match=r"run/config\.yaml: models\.one: .*holds 1 NaN"):
        evolve(None, tmp_path / "run", resume=True)
    assert len(RunFolder(tmp_path / "run").events.read()) == 4  # the saved batch only
    Path(sources["one"]).write_bytes(good)
    evolve(None, tmp_path / "run", resume=True)
    assert tp.run_events(tmp_path / "run") == tp.run_events(tmp_path / "whole")


def test_a_folder_holding_what_a_run_writes_or_an_empty_name_is_not_a_run_dir(tmp_path):
    """A run replaces best/ and report/ whole: a user's folder of that name would go."""
    sources = tp.write_sources(tmp_path / "src")
    mine = tmp_path / "project" / "best" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    with pytest.raises(OutputExistsError, match="holds best but no run"):
        evolve(tp.toy_config(sources), tmp_path / "project")
    assert mine.read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "project").iterdir()) == ["best"]
    with pytest.raises(RecipeError, match="run_dir: empty"):
        evolve(tp.toy_config(sources), "")
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputExistsError, match="afile: exists and is not a folder"):
        evolve(tp.toy_config(sources), tmp_path / "afile" / "sub")
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert evolve(tp.toy_config(sources), tmp_path / "empty").status == "completed"


@pytest.mark.usefixtures("no_evaluation")
def test_unknown_models_and_tasks_of_any_stage_are_named_before_the_search(tmp_path):
    """A later stage may name an earlier stage's result, nothing else the config lacks."""
    sources = tp.write_sources(tmp_path / "src")
    stages = [
        {"name": "a", "algorithm": {"name": "toy-random"}},
        {"name": "b", "algorithm": {"name": "ps", "models": ["a", "one", "nope"]}},
    ]
    cfg = tp.toy_config(sources, algorithm=None, stages=stages, base_model="zero")
    with pytest.raises(RecipeError, match=r"stages\[1\]\.algorithm\.models: unknown model 'nope'"):
        evolve(cfg, tmp_path / "run")
    cfg = tp.toy_config(sources, algorithm={"name": "m2n2", "tasks": ["nope"]})
    with pytest.raises(RecipeError, match=r"algorithm\.tasks: unknown task 'nope' \(known: toy\)"):
        evolve(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_an_empty_run_dir_on_the_command_line_is_refused(shoal_cli, tmp_path):
    """Typer reads an empty path as "."; the run would scatter its files here."""
    sources = tp.write_sources(tmp_path / "src")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tp.toy_config(sources)))
    code, _, err = shoal_cli(["evolve", "cfg.yaml", "--run-dir", ""], tmp_path)
    assert code == 2 and "run_dir: empty" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml", "src"]


@pytest.mark.usefixtures("no_evaluation")
def test_an_option_named_models_of_another_meaning_is_not_taken_for_model_names(tmp_path):
    sources = tp.write_sources(tmp_path / "src")
    cfg = tp.toy_config(sources, algorithm={"name": "toy-random", "models": 3})
    with pytest.raises(AssertionError, match="a candidate was evaluated"):  # checks passed
        evolve(cfg, tmp_path / "run")
