"""CycleQD through ``evolve`` on three digits class-group experts (seconds on a CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from shoal.report.archives import archive_history
from shoal.search.algorithms.base import store_key
from shoal.search.run_folder import RunFolder
from shoal.search.runner import evolve
from shoal.testbed.images import EXPERT_GROUPS_3, write_image_experts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cycleqd-digits.yaml"


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, expert-0-2, expert-3-5, expert-6-9: fine-tunes of one shared init."""
    return write_image_experts(
        tmp_path_factory.mktemp("digits-3"), groups=EXPERT_GROUPS_3, shared_init=True
    )


def _config(experts: dict[str, Path], generations: int = 12, **algo: Any) -> dict[str, Any]:
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["models"] = {k: str(v) for k, v in experts.items()}
    cfg["algorithm"].update(generations=generations, children=2, **algo)
    cfg["progress"] = False
    cfg["baselines"] = False
    return cfg


def _events(run: Path) -> list[tuple]:
    return [(e["recipe"], e["seed"], e["means"], e["error"]) for e in RunFolder(run).events.read()]


def _algo_state(run: Path) -> dict[str, Any]:
    return json.loads((run / "state.json").read_text())["algorithm"]


def test_digits_run_ends_with_the_aggregate_as_best(tmp_path, experts):
    cfg = {**_config(experts), "baselines": True}
    result = evolve(cfg, tmp_path / "run")
    assert result.status == "completed" and result.stop_reason == "algorithm: 12 generations done"
    assert result.evaluations == 3 + 12 * 2 + 1  # experts, children, the aggregate
    summary = result.summary
    assert summary["failed_candidates"] == 0
    best = summary["best"]
    assert best["evaluation"] == result.evaluations - 1  # the last asked candidate
    assert (
        best["recipe"]["merge_method"] == "task_arithmetic" and "svd_mutation" not in best["recipe"]
    )
    assert sum(m["parameters"]["weight"] for m in best["recipe"]["models"]) == pytest.approx(1.0)
    assert (tmp_path / "run" / "best" / "shoal_recipe.yaml").is_file()
    # only the elites still in some archive (and best) are kept in the store
    state = _algo_state(tmp_path / "run")["state"]
    refs = {
        e["data"]["ref"].removeprefix("store:")
        for a in state["archives"]
        for e in a["elites"]
        if e["data"]["ref"].startswith("store:")
    }
    stored = {p.stem for p in (tmp_path / "run" / "store").glob("*.safetensors")}
    assert refs and refs <= stored
    assert stored - refs <= {store_key(best["recipe"])}
    # the SVD factors of the three experts' task vectors, once each, in the run folder
    assert len(list((tmp_path / "run" / "svd").glob("*.safetensors"))) == 3
    # each expert knows only its own classes; the merge of the elites beats every source
    # on the whole test set (measured: 0.44 against 0.36 for the best expert)
    test = best["scores"]["test"]["digits-test"]
    assert test > max(b["test"]["digits-test"] for b in summary["baselines"].values()) + 0.05


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, experts, monkeypatch):
    cfg = _config(experts, generations=6)
    cfg["checkpoint_seconds"] = 0
    evolve(cfg, tmp_path / "full")
    original = RunFolder.write_state
    calls = {"n": 0}

    class Killed(BaseException):
        pass

    def dying(self: RunFolder, state: dict[str, Any]) -> None:
        calls["n"] += 1
        if calls["n"] == 4:  # experts + 2 generations saved, the third's events written
            raise Killed
        original(self, state)

    monkeypatch.setattr(RunFolder, "write_state", dying)
    with pytest.raises(Killed):
        evolve(cfg, tmp_path / "cut")
    monkeypatch.setattr(RunFolder, "write_state", original)
    saved = _algo_state(tmp_path / "cut")["state"]
    assert saved["generation"] == 2 and saved["q"] == 2  # the cycle position is saved
    result = evolve(None, tmp_path / "cut", resume=True)
    assert result.status == "completed"
    assert _events(tmp_path / "cut") == _events(tmp_path / "full")
    assert _algo_state(tmp_path / "cut") == _algo_state(tmp_path / "full")
    best = [
        json.loads((tmp_path / r / "summary.json").read_text())["best"] for r in ("full", "cut")
    ]
    assert best[0]["recipe"] == best[1]["recipe"] and best[0]["scores"] == best[1]["scores"]


def test_a_child_that_fails_enters_no_archive(tmp_path, experts, monkeypatch):
    """One child fails to build (an out-of-memory, say): the run goes on and ends with
    its aggregate, the child in no archive. Scores are lifted to 0.5 + 0.5 x (chance on a
    two-way choice), so the low corner cell where a failure's zeros used to land is empty.
    The experts are scored by name and never copied into the store."""
    from shoal.executors.store import DirStore, MemoryStore
    from shoal.executors.worker import Worker

    build, score = Worker.build, Worker.score
    children = {"n": 0}
    stored: list[str] = []

    def failing_build(self: Worker, recipe: dict[str, Any], seed: int) -> Any:
        if "svd_mutation" in recipe:
            children["n"] += 1
            if children["n"] == 5:  # the first child of generation 3
                raise RuntimeError("simulated out of memory")
        return build(self, recipe, seed)

    def lifted(self: Worker, model: Any, names: Any) -> dict[str, np.ndarray]:
        return {k: 0.5 + 0.5 * v for k, v in score(self, model, names).items()}

    def recording(put: Any) -> Any:
        def recording_put(self: Any, key: str, tensors: Any) -> None:
            stored.append(key)
            put(self, key, tensors)

        return recording_put

    monkeypatch.setattr(Worker, "build", failing_build)
    monkeypatch.setattr(Worker, "score", lifted)
    for store in (DirStore, MemoryStore):
        monkeypatch.setattr(store, "put", recording(store.put))
    result = evolve(_config(experts, generations=4), tmp_path / "run")
    assert result.status == "completed" and result.summary["failed_candidates"] == 1
    assert "simulated out of memory" in result.summary["first_failure"]
    events = RunFolder(tmp_path / "run").events.read()
    failed = [e for e in events if e["error"]]
    assert [e["evaluation"] for e in failed] == [3 + 2 * 2]
    state = _algo_state(tmp_path / "run")["state"]
    elites = [e["data"]["evaluation"] for a in state["archives"] for e in a["elites"]]
    assert failed[0]["evaluation"] not in elites
    assert all(e["means"] for e in events)  # the failure's zeros are still logged
    low = {tuple(e["cell"]) for a in state["archives"] for e in a["elites"]}
    assert (0, 0) not in low  # no model scored in the lowest cell: only a failure could
    best = result.summary["best"]
    assert best["evaluation"] == len(events) - 1  # the aggregate, which did not fail
    assert best["seed"] == events[-1]["seed"]
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    # only merges were copied into the store
    merges = {store_key(e["recipe"]) for e in events if "merge_method" in e["recipe"]}
    assert stored and set(stored) <= merges
    # the report's replay skips the failure too: it ends at the saved archives
    history = archive_history(RunFolder(tmp_path / "run"))
    assert history is not None
    for replayed, saved in zip(history.archives, state["archives"], strict=True):
        assert replayed.state_dict()["elites"] == [
            {**e, "data": {"evaluation": e["data"]["evaluation"]}} for e in saved["elites"]
        ]


def test_an_expert_that_fails_ends_the_run_with_its_name_and_error(
    shoal_cli, tmp_path, experts, monkeypatch
):
    from shoal.executors.worker import Worker

    build = Worker.build

    def failing_build(self: Worker, recipe: dict[str, Any], seed: int) -> Any:
        if recipe == {"model": "expert-3-5"}:
            raise RuntimeError("simulated out of memory")
        return build(self, recipe, seed)

    monkeypatch.setattr(Worker, "build", failing_build)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(_config(experts, generations=2)))
    code, _, err = shoal_cli(["evolve", "cfg.yaml", "--run-dir", "runs/x"], tmp_path)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "cycleqd: expert 'expert-3-5' failed to build or score" in err
    assert "first failure: RuntimeError: simulated out of memory" in err
    assert not (tmp_path / "runs" / "x").exists()  # nothing was saved: nothing is left


def test_a_failed_aggregate_leaves_the_best_elite_as_best(tmp_path, experts, monkeypatch):
    from shoal.executors.worker import Worker

    build = Worker.build

    def failing_build(self: Worker, recipe: dict[str, Any], seed: int) -> Any:
        if "merge_method" in recipe and "svd_mutation" not in recipe:  # the aggregate
            raise RuntimeError("simulated out of memory")
        return build(self, recipe, seed)

    monkeypatch.setattr(Worker, "build", failing_build)
    result = evolve(_config(experts, generations=4), tmp_path / "run")
    assert result.status == "completed" and result.summary["failed_candidates"] == 1
    events = RunFolder(tmp_path / "run").events.read()
    assert events[-1]["error"] and len(events) == 3 + 4 * 2 + 1
    # the best is the elite with the best mean over the tasks (the first such)
    elites = [
        e["data"] for a in _algo_state(tmp_path / "run")["state"]["archives"] for e in a["elites"]
    ]
    want = max(elites, key=lambda d: (np.mean(d["means"]), -d["evaluation"]))
    best = result.summary["best"]
    assert best["evaluation"] == want["evaluation"] and best["recipe"] == want["recipe"]
    assert best["seed"] == events[want["evaluation"]]["seed"] != events[-1]["seed"]
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()


def test_process_executor_equals_serial(tmp_path, experts):
    """Same events; and either run leaves the caller's torch thread count as it found it
    (the serial worker and the one that scores the best set their own)."""
    cfg = _config(experts, generations=2)
    # a count no worker here sets (the one scoring the best takes cpu_count // workers);
    # the fixture restores the suite's count after the test
    mine = max(1, (os.cpu_count() or 1) // 2) + 1
    torch.set_num_threads(mine)
    evolve(cfg, tmp_path / "serial")
    assert torch.get_num_threads() == mine
    cfg["executor"] = {"type": "process", "workers": 2}
    evolve(cfg, tmp_path / "process")
    assert torch.get_num_threads() == mine
    assert _events(tmp_path / "process") == _events(tmp_path / "serial")


def _chain(experts: dict[str, Path], seeds: list[str]) -> dict[str, Any]:
    """PS over the three experts, then CycleQD seeded with ``seeds`` (PS's result: "ps")."""
    cfg = _config(experts, generations=2, seeds=seeds)
    cqd = cfg.pop("algorithm")
    cfg.pop("budget")
    ps = {"name": "ps", "models": ["expert-0-2", "expert-3-5", "expert-6-9"], "popsize": 4}
    cfg["stages"] = [
        {"name": "ps", "algorithm": ps, "budget": {"evaluations": 8}},
        {"name": "cqd", "algorithm": cqd},
    ]
    return cfg


def test_a_chain_seeds_cycleqd_with_the_earlier_stage_result(tmp_path, experts):
    result = evolve(_chain(experts, ["ps"]), tmp_path / "run")
    assert result.status == "completed"
    stages = tmp_path / "run" / "stages"
    # the chain's summary (and so its report) carries the CycleQD stage's specialists
    cqd_summary = json.loads((stages / "cqd" / "summary.json").read_text())
    assert result.summary["specialists"] == cqd_summary["specialists"]
    assert sorted(result.summary["specialists"]) == [
        f"best-digits-train-{g}" for g in ("0-2", "3-5", "6-9")
    ]
    from shoal.report import write_report

    summary_md = (write_report(tmp_path / "run") / "summary.md").read_text()
    assert "| best-digits-train-0-2 |" in summary_md
    events = RunFolder(stages / "cqd").events.read()
    assert [e["recipe"] for e in events[:4]] == [
        {"model": m} for m in ("expert-0-2", "expert-3-5", "expert-6-9", "ps")
    ]
    assert len(events) == 4 + 2 * 2 + 1  # the seeds, two generations of two, the aggregate
    # the seed is PS's best read back from disk: it scores what PS's stage measured for it
    ps_best = json.loads((stages / "ps" / "summary.json").read_text())["best"]["scores"]
    for task, mean in events[3]["means"].items():
        assert mean == pytest.approx(ps_best["fitness"][task], abs=1e-12)
    # the behaviour ranges come from the experts alone: [0.85 × weakest, 1.15 × strongest]
    state = _algo_state(stages / "cqd")["state"]
    tasks = state["tasks"]
    expert_means = [[e["means"][t] for t in tasks] for e in events[:3]]
    for k, archive in enumerate(state["archives"]):
        others = [j for j in range(len(tasks)) if j != k]
        want = [
            [0.85 * min(m[j] for m in expert_means), 1.15 * max(m[j] for m in expert_means)]
            for j in others
        ]
        assert np.array(archive["ranges"]) == pytest.approx(np.array(want))
    # the report replays the four seeds as one step, then ends at the saved archives
    history = archive_history(RunFolder(stages / "cqd"))
    assert history is not None and history.evaluations[:2] == [4, 5]
    for replayed, saved in zip(history.archives, state["archives"], strict=True):
        assert [e["cell"] for e in replayed.state_dict()["elites"]] == [
            e["cell"] for e in saved["elites"]
        ]


@pytest.mark.parametrize(
    ("seeds", "needle"),
    [
        (["cqd"], "stages[1].algorithm.seeds: unknown model 'cqd'"),  # the stage itself
        (["expert-0-2"], "stages[1].algorithm.seeds: 'expert-0-2' (entry 0) is already"),
        (["ps", "ps"], "stages[1].algorithm.seeds: 'ps' (entry 1) is already"),
    ],
)
def test_bad_seeds_of_a_later_stage_are_refused_before_anything_runs(
    shoal_cli, tmp_path, experts, seeds, needle
):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(_chain(experts, seeds)))
    code, _, err = shoal_cli(["evolve", "cfg.yaml", "--run-dir", "runs/x"], tmp_path)
    assert code == 2, err
    assert err.strip().count("\n") == 0 and needle in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            {"experts": {"digits-train-0-2": "expert-0-2", "digits-train-3-5": "expert-3-5"}},
            "stages[1].algorithm.experts: task 'digits-train-6-9' has no expert model",
        ),
        ({"tasks": ["digits-train-0-2"]}, "stages[1].algorithm.tasks: cycleqd needs at least two"),
        (
            {"ranges": {"digits-train-3-5": [0.9, 0.2]}},
            "stages[1].algorithm.ranges.digits-train-3-5: range [0.9, 0.2] is empty or inverted",
        ),
        ({"range_scale": [1.2, 0.8]}, "stages[1].algorithm.range_scale: [1.2, 0.8] is inverted"),
        (
            {"ranges": {"nosuch": [0.1, 0.2]}},
            "stages[1].algorithm.ranges.nosuch: not one of the skill tasks",
        ),
    ],
)
def test_bad_options_of_a_later_stage_are_refused_before_anything_runs(
    shoal_cli, tmp_path, experts, change, needle
):
    cfg = _chain(experts, ["ps"])
    cfg["stages"][1]["algorithm"].update(change)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = shoal_cli(["evolve", "cfg.yaml", "--run-dir", "runs/x"], tmp_path)
    assert code == 2, err
    assert err.strip().count("\n") == 0 and needle in err and err.startswith("error: cfg.yaml: ")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_ray_equals_serial(tmp_path, experts):
    pytest.importorskip("ray")
    cfg = _config(experts, generations=3)
    evolve(cfg, tmp_path / "serial")
    cfg["executor"] = {"type": "ray", "workers": 2}
    evolve(cfg, tmp_path / "ray", ray_init={"num_cpus": 2, "include_dashboard": False})
    assert _events(tmp_path / "ray") == _events(tmp_path / "serial")


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (
            [
                "algorithm.tasks=[digits-train-0-2]",
                "algorithm.experts={digits-train-0-2: expert-0-2}",
            ],
            "algorithm.tasks: cycleqd needs at least two skill tasks",
        ),
        (
            ["algorithm.experts={digits-train-0-2: expert-0-2, digits-train-3-5: expert-3-5}"],
            "algorithm.experts: task 'digits-train-6-9' has no expert model",
        ),
        (
            [
                "algorithm.experts={digits-train-0-2: expert-0-2, digits-train-3-5: expert-3-5,"
                " digits-train-6-9: expert-0-2}"
            ],
            "algorithm.experts.digits-train-6-9: 'expert-0-2' is already the expert of "
            "'digits-train-0-2'",
        ),
        (["algorithm.bins=0"], "algorithm.bins:"),
        (["algorithm.bins=1001"], "algorithm.bins: Input should be less than or equal to 1000"),
        (
            ["algorithm.experts.digits-train-0-2=base"],
            "algorithm.experts.digits-train-0-2: 'base' is the base model",
        ),
        (["algorithm.ranges={digits-train-3-5: [0.9, 0.2]}"], "algorithm.ranges.digits-train-3-5:"),
        (["base_model=null"], "base_model:"),
    ],
)
def test_bad_config_is_one_line_exit_2_nothing_written(shoal_cli, tmp_path, experts, sets, needle):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(_config(experts)))
    args = ["evolve", "cfg.yaml", "--run-dir", "runs/x"]
    for s in sets:
        args += ["--set", s]
    code, _, err = shoal_cli(args, tmp_path)
    assert code == 2, err
    assert err.strip().count("\n") == 0 and needle in err
    assert not (tmp_path / "runs").exists()


def test_an_expert_lacking_a_tensor_stops_the_run_at_once(shoal_cli, tmp_path, experts):
    """The preflight requires the ``*.weight`` tensors; a model that lacks another one (a
    bias) cannot be the model the run builds: the first batch stops the run in one line."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(experts["expert-6-9"]))
    bad = tmp_path / "nobias.safetensors"
    save_file({k: v for k, v in tensors.items() if k != "2.bias"}, str(bad))
    cfg = _config(experts, generations=2)
    cfg["models"]["expert-6-9"] = str(bad)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = shoal_cli(["evolve", "cfg.yaml", "--run-dir", "runs/x"], tmp_path)
    assert code == 2, err
    assert err.strip().count("\n") == 0
    assert err.startswith("error: cfg.yaml: models.expert-6-9: ")
    assert "nobias.safetensors" in err and "'2.bias'" in err
    assert not (tmp_path / "runs").exists()


def test_an_expert_with_a_tensor_the_model_has_no_place_for_stops_the_run(
    shoal_cli, tmp_path, experts
):
    """Not cut off silently (a deeper model's layers would be): one line, exit 2."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(experts["expert-6-9"]))
    extra = tmp_path / "extra.safetensors"
    save_file({**tensors, "extra.weight": torch.ones(3)}, str(extra))
    cfg = _config(experts, generations=1)
    cfg["models"]["expert-6-9"] = str(extra)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = shoal_cli(["evolve", "cfg.yaml", "--run-dir", "runs/x"], tmp_path)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert err.startswith("error: cfg.yaml: models.expert-6-9: ") and "'extra.weight'" in err
    assert not (tmp_path / "runs").exists()
