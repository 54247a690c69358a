"""``tasks.validation``: held-out tasks scored for the best and the baselines, apart from test."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from shoal.report import write_report
from shoal.search.runner import evolve

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "m2n2-digits-scratch.yaml"


def test_validation_tasks_are_scored_apart_from_test(tmp_path):
    cfg = yaml.safe_load(EXAMPLE.read_text())
    test = cfg["tasks"]["test"][0]
    # the validation task is the test task under another name: the same numbers must
    # come back, filed under their own split and in no other
    cfg["tasks"]["validation"] = [{**test, "name": "digits-val"}]
    cfg.update(budget={"evaluations": 60}, progress=False)
    result = evolve(cfg, tmp_path / "run")
    scores = result.summary["best"]["scores"]
    assert list(scores) == ["fitness", "validation", "test"]
    assert list(scores["validation"]) == ["digits-val", "mean"]
    assert "digits-val" not in scores["test"] and "digits-val" not in scores["fitness"]
    assert scores["validation"]["digits-val"] == scores["test"]["digits-test"]
    text = (write_report(tmp_path / "run") / "summary.md").read_text()
    head = next(line for line in text.splitlines() if line.startswith("| model |"))
    assert head.index("digits-val (validation)") < head.index("digits-test (test)")


def test_a_bad_validation_task_is_named_before_the_run(tmp_path):
    from shoal.errors import ShoalError

    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["tasks"]["validation"] = [{"type": "nope"}]
    cfg["progress"] = False
    with pytest.raises(ShoalError, match=r"tasks\.validation\[0\]"):
        evolve(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "state.json").exists()
