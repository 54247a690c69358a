"""M2N2 through the run loop: the flat build of small models changes nothing but the speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shoal.executors import flat
from shoal.search.run_folder import RunFolder
from shoal.search.runner import evolve
from shoal.testbed.images import accuracy, load_digits_data, train_experts, write_image_experts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _events(run: Path) -> list[tuple]:
    """What a run decided: recipes, seeds and scores (not timings or worker ids)."""
    return [(e["recipe"], e["seed"], e["means"], e["error"]) for e in RunFolder(run).events.read()]


def _archive_refs(run_dir: Path) -> list[str]:
    state = json.loads((run_dir / "state.json").read_text())
    return list(state["algorithm"]["state"]["refs"])


@pytest.mark.parametrize(
    "chromosomes", [None, ["0.", ""], ["0."]], ids=["one-vector", "two", "two-implicit-rest"]
)
def test_flat_and_general_builds_run_the_same_search(tmp_path, monkeypatch, chromosomes) -> None:
    sets = ["budget.evaluations=60", "algorithm.archive_size=6", "progress=false"]
    if chromosomes:  # hidden layer and output layer split separately
        sets.append(f"algorithm.chromosomes={json.dumps(chromosomes)}")
    config = EXAMPLES / "m2n2-digits-scratch.yaml"
    fast = evolve(config, tmp_path / "flat", overrides=sets)
    monkeypatch.setattr(flat, "MAX_PARAMETERS", 0)  # every candidate through merge_into_module
    general = evolve(config, tmp_path / "general", overrides=sets)
    assert _events(tmp_path / "flat") == _events(tmp_path / "general")
    assert _archive_refs(tmp_path / "flat") == _archive_refs(tmp_path / "general")
    assert fast.summary["best"]["scores"] == general.summary["best"]["scores"]


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
            ],
            "test": [
                {
                    "type": "python",
                    "target": "shoal.testbed.images:image_task",
                    "options": {"split": "test"},
                }
            ],
        },
        "algorithm": {"name": "m2n2", "archive_size": 4},
        "budget": {"evaluations": evaluations},
        "executor": {"type": "serial"},
        "progress": False,
    }


def test_from_two_expert_files_flat_equals_general_and_beats_both(tmp_path, monkeypatch) -> None:
    paths = write_image_experts(tmp_path / "experts")
    assert sorted(paths) == ["expert-0-4", "expert-5-9"]
    result = evolve({**_two_expert_config(paths, 300), "baselines": True}, tmp_path / "flat")
    monkeypatch.setattr(flat, "MAX_PARAMETERS", 0)
    evolve(_two_expert_config(paths, 40), tmp_path / "general")
    assert _events(tmp_path / "general") == _events(tmp_path / "flat")[:40]
    # the published outcome in small: a merge of the two experts beats both on test data,
    # each expert scored in the same run (and by hand: the baseline is the expert file)
    data = load_digits_data()
    experts = result.summary["baselines"]
    for name, model in train_experts(data).items():
        want = accuracy(model, data.x_test, data.y_test)
        assert experts[name]["test"]["digits-test"] == pytest.approx(want)
    best_expert = max(s["test"]["digits-test"] for s in experts.values())
    assert result.summary["best"]["scores"]["test"]["digits-test"] > best_expert + 0.1


def test_an_unnamed_task_gets_one_name_on_every_executor(tmp_path) -> None:
    """Workers in other processes name a task as the serial one does (M2N2 needs the name)."""
    paths = write_image_experts(tmp_path / "experts")
    config = _two_expert_config(paths, 8)
    evolve(config, tmp_path / "serial")
    evolve(config, tmp_path / "process", executor="process")
    assert _events(tmp_path / "process") == _events(tmp_path / "serial")
