"""`shoal demo`: an ordinary evolve run of the digits example, end to end on a short budget."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from shoal.cli.demo_cmd import DEMO_CONFIG
from shoal.testbed.images import accuracy, build_mlp, load_digits_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "m2n2-digits-scratch.yaml"


def _demo(shoal_cli, run_dir: Path, evaluations: int, *extra: str) -> tuple[int, str, str]:
    args = ["demo", "--evaluations", str(evaluations), "--run-dir", str(run_dir), "--no-progress"]
    return shoal_cli([*args, *extra])


def test_the_demo_is_the_digits_example() -> None:
    """`shoal evolve examples/m2n2-digits-scratch.yaml` reproduces the demo."""
    example = yaml.safe_load(EXAMPLE.read_text())
    assert example == DEMO_CONFIG


def test_demo_writes_a_run_folder_that_report_reads(shoal_cli, tmp_path) -> None:
    run_dir = tmp_path / "demo"
    code, out, err = _demo(shoal_cli, run_dir, 200)
    assert code == 0, err
    assert f"best: {run_dir / 'best'}" in out
    for rel in ("config.yaml", "state.json", "events.jsonl", "best/model.safetensors"):
        assert (run_dir / rel).is_file(), rel
    assert (run_dir / "report" / "fitness.png").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["evaluations"] == 200
    # the saved best model reproduces the reported test accuracy
    model = build_mlp()
    model.load_state_dict(load_file(str(run_dir / "best/model.safetensors")))
    data = load_digits_data()
    acc = accuracy(model, data.x_test, data.y_test)
    assert acc == pytest.approx(summary["best"]["scores"]["test"]["digits-test"])
    assert f"test accuracy of the best-training member: {acc:.3f}" in out
    assert acc > 0.15  # beats chance (0.1) already
    code, out, err = shoal_cli(["report", str(run_dir)])
    assert code == 0, err
    # a second demo replaces its own finished run; nothing else is left beside it
    code, _, err = _demo(shoal_cli, run_dir, 100)
    assert code == 0, err
    assert json.loads((run_dir / "summary.json").read_text())["evaluations"] == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_demo_refuses_a_folder_that_is_not_a_demo_run(shoal_cli, tmp_path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    code, _, err = _demo(shoal_cli, foreign, 100)
    assert code == 2 and err.count("\n") == 1, err
    assert "is not a demo run" in err
    assert (foreign / "precious.txt").read_text() == "keep"


def test_an_interrupted_demo_is_continued(shoal_cli, tmp_path) -> None:
    from shoal.search.runner import evolve

    run_dir = tmp_path / "demo"
    whole = tmp_path / "whole"
    config = {**DEMO_CONFIG, "budget": {"evaluations": 120}, "progress": False}
    evolve(config, whole)
    # a demo run killed after its checkpoint at 60 evaluations
    evolve({**config, "budget": {"evaluations": 60}}, run_dir)
    (run_dir / "summary.json").unlink()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["budget"] = {"evaluations": 120}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = _demo(shoal_cli, run_dir, 120)
    assert code == 0, err
    lines = (run_dir / "events.jsonl").read_text().splitlines()
    want = (whole / "events.jsonl").read_text().splitlines()
    assert [json.loads(x)["recipe"] for x in lines] == [json.loads(x)["recipe"] for x in want]


def test_demo_touches_only_a_folder_it_wrote_and_no_running_one(shoal_cli, tmp_path) -> None:
    from shoal._atomic import hold_lock
    from shoal.search.runner import evolve

    demo = tmp_path / "demo"
    assert _demo(shoal_cli, demo, 100)[0] == 0
    (demo / "NOTES.txt").write_text("mine")  # a user's file in it: not the demo's to delete
    code, _, err = _demo(shoal_cli, demo, 100)
    assert code == 2 and "is not a demo run" in err
    assert (demo / "NOTES.txt").read_text() == "mine"
    (demo / "NOTES.txt").unlink()
    with hold_lock(demo / ".lock", str(demo)):  # a demo still running there
        code, _, err = _demo(shoal_cli, demo, 100)
    assert code == 2 and f"in use by process {os.getpid()}" in err, err
    assert (demo / "summary.json").is_file()  # untouched
    # a run of the example with other options is the user's, not the demo's
    other = tmp_path / "other"
    cfg = {**DEMO_CONFIG, "budget": {"evaluations": 60}, "progress": False}
    evolve({**cfg, "algorithm": {**cfg["algorithm"], "archive_size": 6}}, other)
    code, _, err = _demo(shoal_cli, other, 100)
    assert code == 2 and "is not a demo run" in err
    assert json.loads((other / "summary.json").read_text())["evaluations"] == 60


def test_a_demo_folder_of_the_old_layout_is_replaced(shoal_cli, tmp_path) -> None:
    """`make demo` after an upgrade: the folder the demo wrote before 2026-12 (its own
    layout, summary.json with kind m2n2-image) is the demo's to replace."""
    old = tmp_path / "demo"
    (old / "best").mkdir(parents=True)
    for name in ("config.yaml", "state.json", "store.safetensors", "history.jsonl"):
        (old / name).write_text("x")
    (old / "summary.json").write_text(json.dumps({"kind": "m2n2-image", "evaluations": 9}))
    code, _, err = _demo(shoal_cli, old, 100)
    assert code == 0, err
    assert json.loads((old / "summary.json").read_text())["evaluations"] == 100
    assert not (old / "history.jsonl").exists()
