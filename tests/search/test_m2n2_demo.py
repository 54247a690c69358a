"""`shoal demo` end to end on a short budget, and the run folder it writes."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from shoal.cli.main import app
from shoal.errors import OutputExistsError
from shoal.search.m2n2_digits import run_image_m2n2, write_run_folder
from shoal.testbed.images import accuracy, build_mlp, load_digits_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_cli_writes_run_folder(tmp_path) -> None:
    run_dir = tmp_path / "demo"
    res = CliRunner().invoke(
        app, ["demo", "--evaluations", "200", "--run-dir", str(run_dir), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert str(run_dir) in res.output
    for rel in (
        "config.yaml",
        "state.json",
        "store.safetensors",
        "history.jsonl",
        "best/model.safetensors",
        "best/config.json",
        "report/accuracy.png",
        "report/diversity.png",
    ):
        assert (run_dir / rel).is_file(), rel
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["evaluations"] == 200
    # the saved best model reproduces the reported test accuracy
    model = build_mlp()
    model.load_state_dict(load_file(str(run_dir / "best/model.safetensors")))
    data = load_digits_data()
    acc = accuracy(model, data.x_test, data.y_test)
    assert acc == pytest.approx(summary["best"]["test_accuracy"])
    assert acc > 0.15  # beats chance (0.1) already
    # a second demo replaces its own earlier run folder; nothing else is left beside it
    res = CliRunner().invoke(
        app, ["demo", "--evaluations", "100", "--run-dir", str(run_dir), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((run_dir / "summary.json").read_text())["evaluations"] == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_run_folder_refuses_foreign_directory(tmp_path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    run = run_image_m2n2(evaluations=40, options={"archive_size": 4}, record_every=20)
    with pytest.raises(OutputExistsError, match="mine exists"):
        write_run_folder(run, foreign)
    assert (foreign / "precious.txt").read_text() == "keep"


def test_experts_run_beats_both_experts_quickly() -> None:
    run = run_image_m2n2(evaluations=400, experts=True, options={"seed": 0}, record_every=400)
    data = load_digits_data()
    from shoal.testbed.images import train_experts

    best_expert = max(accuracy(m, data.x_test, data.y_test) for m in train_experts(data).values())
    assert run.summary["best"]["test_accuracy"] > best_expert + 0.1
    assert run.summary["options"]["init"] == "seeds"
