"""M2N2 through the generic run loop (recipes, store, executor) agrees with the fast path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoal.search.m2n2_digits import run_image_m2n2
from shoal.search.runner import evolve
from shoal.testbed.images import write_image_experts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _archive_refs(run_dir: Path) -> list[str]:
    state = json.loads((run_dir / "state.json").read_text())
    return list(state["algorithm"]["state"]["refs"])


@pytest.mark.parametrize(
    "chromosomes", [None, ["0.", ""], ["0."]], ids=["one-vector", "two", "two-implicit-rest"]
)
def test_runner_and_fast_path_build_the_same_archive(tmp_path, chromosomes) -> None:
    n = 40
    sets = [f"budget.evaluations={n}", "algorithm.archive_size=6"]
    options: dict = {"seed": 0, "archive_size": 6}
    if chromosomes:  # hidden layer and output layer split separately
        sets.append(f"algorithm.chromosomes={json.dumps(chromosomes)}")
        options["chromosomes"] = chromosomes
    result = evolve(
        EXAMPLES / "m2n2-digits-scratch.yaml", tmp_path / "run", overrides=sets, progress=False
    )
    fast = run_image_m2n2(evaluations=n, options=options, record_every=n)
    # same recipes, same random streams, same store keys: the same archive, member by member
    assert _archive_refs(tmp_path / "run") == fast.runner.algo.refs
    best = result.summary["best"]
    assert best["fitness"] == pytest.approx(fast.summary["best"]["train_accuracy"])
    assert best["scores"]["test"]["digits-test"] == pytest.approx(
        fast.summary["best"]["test_accuracy"]
    )


def _two_expert_config(paths: dict[str, Path], evaluations: int) -> dict:
    """M2N2 over two image experts; the fitness task has no ``name`` (a python task)."""
    return {
        "models": {k: str(v) for k, v in paths.items()},
        "loader": {"type": "callable", "target": "shoal.testbed.images:digits_mlp"},
        "tasks": {
            "fitness": [
                {
                    "type": "python",
                    "target": "shoal.testbed.images:image_task",
                    "options": {"split": "train"},
                }
            ]
        },
        "algorithm": {"name": "m2n2", "archive_size": 4},
        "budget": {"evaluations": evaluations},
        "executor": {"type": "serial"},
        "progress": False,
    }


def test_runner_from_two_expert_files(tmp_path) -> None:
    paths = write_image_experts(tmp_path / "experts")
    assert sorted(paths) == ["expert-0-4", "expert-5-9"]
    evolve(_two_expert_config(paths, 12), tmp_path / "run")
    fast = run_image_m2n2(
        evaluations=12, experts=True, options={"seed": 0, "archive_size": 4}, record_every=12
    )
    assert _archive_refs(tmp_path / "run") == fast.runner.algo.refs


def test_an_unnamed_task_gets_one_name_on_every_executor(tmp_path) -> None:
    """Workers in other processes name a task as the serial one does (M2N2 needs the name)."""
    from shoal.search.run_folder import RunFolder

    paths = write_image_experts(tmp_path / "experts")
    config = _two_expert_config(paths, 8)
    evolve(config, tmp_path / "serial")
    evolve(config, tmp_path / "process", executor="process")

    def events(run: Path) -> list[tuple]:
        return [(e["recipe"], e["seed"], e["means"]) for e in RunFolder(run).events.read()]

    assert events(tmp_path / "process") == events(tmp_path / "serial")
