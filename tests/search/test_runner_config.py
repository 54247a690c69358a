"""Config validation: every bad input is one RecipeError/TaskError naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import toy_problem as tp
import yaml

from shoal.errors import RecipeError, TaskError
from shoal.search.config import apply_overrides, load_config
from shoal.search.runner import evolve

SOURCES = {"zero": "/nonexistent/zero.safetensors", "one": "/nonexistent/one.safetensors"}


def _cfg(**kw):
    return tp.toy_config(SOURCES, **kw)


def test_overrides_parse_yaml_scalars_and_index_lists():
    data = {"a": {"b": 1}, "stages": [{"budget": {}}]}
    apply_overrides(
        data,
        [
            "a.b=3",
            "a.c=0.5",
            "a.d=true",
            "a.e=[1, 2]",
            "x.y=hello",
            "stages.0.budget.evaluations=5",
        ],
    )
    assert data["a"] == {"b": 3, "c": 0.5, "d": True, "e": [1, 2]}
    assert data["x"] == {"y": "hello"}
    assert data["stages"][0]["budget"]["evaluations"] == 5
    with pytest.raises(RecipeError, match="key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(RecipeError, match=r"stages\.3"):
        apply_overrides({"stages": []}, ["stages.3.x=1"])


def test_file_config_relative_paths_and_overrides(tmp_path: Path):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(_cfg(models={"zero": "m/zero.st"})))
    cfg = load_config(tmp_path / "cfg.yaml", ["budget.evaluations=3", "seed=11"])
    assert cfg.budget.evaluations == 3 and cfg.seed == 11
    assert cfg.models["zero"] == str(tmp_path.resolve() / "m" / "zero.st")
    assert cfg.resolve("data/x.jsonl") == tmp_path.resolve() / "data" / "x.jsonl"
    # the resolved config round-trips
    again = load_config(yaml.safe_load(cfg.to_yaml()))
    assert again.model_dump() == cfg.model_dump()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"budgett": {}}, r"budgett: unknown key"),
        ({"budget": {"evaluation": 3}}, r"budget\.evaluation: unknown key"),
        ({"budget": {"evaluations": 0}}, r"budget\.evaluations: .*greater than or equal to 1"),
        ({"executor": {"type": "mpi"}}, r"executor\.type"),
        ({"seed": "abc"}, r"seed: "),
        ({"base_model": "nope"}, r"base_model 'nope' is not one of models"),
        ({"stages": [{"name": "s", "algorithm": {"name": "toy-random"}}]}, r"exactly one of"),
        ({"algorithm": {"population": 3}}, r"needs `name`"),
        ({"loader": {"type": "callable"}}, r"loader.target"),
    ],
)
def test_bad_config_names_the_key(change, match):
    with pytest.raises(RecipeError, match=match):
        load_config(_cfg(**change))


def test_bad_yaml_and_missing_file(tmp_path: Path):
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml:2:1: not valid YAML") as info:
        load_config(tmp_path / "bad.yaml")
    assert "\n" not in str(info.value)  # one line
    (tmp_path / "twice.yaml").write_text("seed: 0\nmodels: {}\nseed: 1\n")
    with pytest.raises(RecipeError, match=r"twice\.yaml:3:1: .*'seed' given twice"):
        load_config(tmp_path / "twice.yaml")
    with pytest.raises(RecipeError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            {"algorithm": {"name": "nope"}},
            RecipeError,
            r"unknown algorithm 'nope' \(known: .*toy-random",
        ),
        (
            {"algorithm": {"name": "toy-random", "popsize": 3}},
            RecipeError,
            r"algorithm\.popsize: unknown option",
        ),
        (
            {"algorithm": {"name": "toy-random", "population": 0}},
            RecipeError,
            r"algorithm\.population",
        ),
        (
            {"tasks": {"fitness": [{"type": "nope"}]}},
            TaskError,
            r"tasks\.fitness\[0\]\.type: unknown task type 'nope'",
        ),
        (
            {"tasks": {"fitness": [{"type": "jsonl", "path": "x.jsonl", "promt_key": "q"}]}},
            TaskError,
            r"tasks\.fitness\[0\]\.promt_key: unknown key for task type jsonl",
        ),
        (
            {"tasks": {"fitness": [{"type": "function", "name": "t", "size": 5}]}},
            TaskError,
            r"tasks\.fitness\[0\]\.target",
        ),
    ],
)
def test_bad_algorithm_or_task_fails_before_evaluating(tmp_path, change, error, match):
    sources = tp.write_sources(tmp_path / "src")
    cfg = tp.toy_config(sources, **change)
    with pytest.raises(error, match=match):
        evolve(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "events.jsonl").exists()


def test_resume_refuses_a_changed_config(tmp_path: Path) -> None:
    """A config or --set given with --resume must match the saved run, not be ignored."""
    from shoal.errors import StateError

    cfg = tp.toy_config(tp.write_sources(tmp_path / "src"), budget={"evaluations": 8})
    evolve(cfg, tmp_path / "run")
    # the same config again is accepted, and so is another executor
    done = evolve(cfg, tmp_path / "run", resume=True, executor="serial")
    assert done.evaluations == 8
    with pytest.raises(StateError, match="budget"):
        evolve(cfg, tmp_path / "run", resume=True, overrides=["budget.evaluations=99"])
    with pytest.raises(StateError, match="seed"):
        evolve({**cfg, "seed": 1}, tmp_path / "run", resume=True)
    # --set alone (no CONFIG, as on the command line) is checked against the saved config
    with pytest.raises(StateError, match="budget"):
        evolve(None, tmp_path / "run", resume=True, overrides=["budget.evaluations=99"])


def test_loader_model_path_resolves_against_the_config(tmp_path: Path):
    (tmp_path / "m").mkdir()
    loader = {"type": "hf-causal-lm", "model": "m"}
    cfg = load_config(_cfg(loader=loader), root=tmp_path)
    assert cfg.loader.model == str(tmp_path.resolve() / "m")
    # a model name stays a name; so does a path that is not there (the run check names it)
    for name in ("zero", "nowhere"):
        cfg = load_config(_cfg(loader={**loader, "model": name}), root=tmp_path)
        assert cfg.loader.model == name


def test_relative_root_is_relative_to_the_config_file_and_saved_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "models").mkdir()
    path = tmp_path / "cfgs" / "run.yaml"
    path.write_text(yaml.safe_dump({**_cfg(), "root": "..", "models": {"a": "models/a"}}))
    monkeypatch.chdir(tmp_path / "models")  # neither the config's folder nor the root
    cfg = load_config(path)
    assert cfg.root == str(tmp_path.resolve())
    assert cfg.models == {"a": str(tmp_path.resolve() / "models" / "a")}
    again = tmp_path / "saved.yaml"
    again.write_text(cfg.to_yaml())
    monkeypatch.chdir("/")
    assert load_config(again).models == cfg.models  # the saved config resumes anywhere
