"""``shoal evolve`` / ``shoal report`` end to end through the command line (toy problem)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import toy_problem as tp
import yaml

HERE = Path(__file__).resolve().parent


def _shoal(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, "-m", "shoal.cli.main", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_evolve_resume_and_report_via_cli(shoal_cli, tmp_path):
    sources = tp.write_sources(tmp_path / "src")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tp.toy_config(sources)))
    out = _shoal(
        "evolve",
        "cfg.yaml",
        "--run-dir",
        "runs/x",
        "--set",
        "budget.evaluations=8",
        "--no-progress",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "8 evaluations" in out.stdout and "best: runs/x/best" in out.stdout
    run = tmp_path / "runs" / "x"
    for name in ("fitness.png", "tasks.png", "parameters.png", "summary.md"):
        assert (run / "report" / name).is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["budget"]["evaluations"] == 8
    # a second run into the same folder is refused in one line, exit code 2
    code, _, err = shoal_cli(["evolve", "cfg.yaml", "--run-dir", "runs/x"], tmp_path)
    assert code == 2 and err.count("\n") == 1 and "--resume" in err
    # resume of a finished run ends at once with the same summary
    before = json.loads((run / "summary.json").read_text())
    code, _, err = shoal_cli(
        ["evolve", "--run-dir", "runs/x", "--resume", "--no-progress"],
        tmp_path,
    )
    assert code == 0, err
    after = json.loads((run / "summary.json").read_text())
    assert after["best"]["recipe"] == before["best"]["recipe"] and after["evaluations"] == 8
    (run / "report" / "fitness.png").unlink()
    code, out_text, _ = shoal_cli(["report", "runs/x"], tmp_path)
    assert code == 0 and (run / "report" / "fitness.png").is_file() and "summary.md" in out_text


def test_cli_config_errors_are_one_line(shoal_cli, tmp_path):
    sources = tp.write_sources(tmp_path / "src")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tp.toy_config(sources)))
    for args, needle in [
        (["--set", "budget.evaluatons=3"], "budget.evaluatons: unknown key"),
        (["--set", "algorithm.popsize=3"], "algorithm.popsize: unknown option"),
        (["--executor", "mpi"], "unknown executor 'mpi'"),
    ]:
        code, _, err = shoal_cli(
            ["evolve", "cfg.yaml", "--run-dir", f"runs/{len(args[1])}", *args],
            tmp_path,
        )
        assert code == 2, err
        assert err.strip().count("\n") == 0 and needle in err
    code, _, err = shoal_cli(["report", "nowhere"], tmp_path)
    assert code == 2 and "not a run folder" in err


def test_failed_candidates_are_counted_and_warned_about(shoal_cli, tmp_path):
    sources = tp.write_sources(tmp_path / "src")
    cfg = tp.toy_config(sources)
    cfg["tasks"]["fitness"][0]["target"] = "toy_problem:score_or_raise"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    args = ["evolve", "cfg.yaml", "--run-dir", "runs/f", "--set", "budget.evaluations=12"]
    code, out, err = shoal_cli([*args, "--no-progress"], tmp_path)
    assert code == 0, err
    assert "12 evaluations" in out
    run = tmp_path / "runs" / "f"
    events = [json.loads(line) for line in (run / "events.jsonl").open()]
    failed = [e for e in events if e["error"]]
    assert 0 < len(failed) < len(events)  # the toy draws x on both sides of 0.6
    summary = json.loads((run / "summary.json").read_text())
    assert summary["failed_candidates"] == len(failed)
    assert summary["first_failure"] == failed[0]["error"] and "x above 0.6" in err
    assert f"warning: {len(failed)} candidates failed" in err


def test_a_task_failing_at_the_end_is_reported_and_the_run_completes(shoal_cli, tmp_path):
    """The search is done when the best and the baselines are scored on every split: a
    task that raises then is named in the summary and a warning, not a traceback, and the
    run completes (best/ is written before it is scored)."""
    sources = tp.write_sources(tmp_path / "src")
    cfg = tp.toy_config(sources, baselines=True)
    cfg["tasks"]["test"][0]["target"] = "toy_problem:raise_always"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = shoal_cli(
        ["evolve", "cfg.yaml", "--run-dir", "runs/e", "--no-progress"], tmp_path
    )
    assert code == 0, err
    assert "Traceback" not in err
    assert "(not scored: see the warnings)" in out
    warning = "could not be built or scored at the end: ValueError: this task always fails"
    assert f"warning: best {warning}" in err and f"warning: baseline zero {warning}" in err
    run = tmp_path / "runs" / "e"
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["failed_at_the_end"]) == {"best", "baseline zero", "baseline one"}
    assert "scores" not in summary["best"] and tmp_path / summary["best"]["path"] == run / "best"
    assert (run / "best").is_dir() and summary.get("baselines") == {}
    text = (run / "report" / "summary.md").read_text()
    assert "- could not be built or scored at the end: best (ValueError: this task" in text


def test_a_baseline_failing_at_the_end_is_not_called_scored(shoal_cli, tmp_path):
    """The baseline 'one' (x = 1) fails its test task; the best and 'zero' do not: the
    comparison with the strongest baseline says one was left out."""
    cfg = tp.toy_config(tp.write_sources(tmp_path / "src"), baselines=True)
    cfg["tasks"]["test"][0]["target"] = "toy_problem:score_or_raise"
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = shoal_cli(
        ["evolve", "cfg.yaml", "--run-dir", "runs/b", "--no-progress"], tmp_path
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "runs" / "b" / "summary.json").read_text())
    assert list(summary["failed_at_the_end"]) == ["baseline one"]
    assert "scores" in summary["best"] and "(fitness " in out
    text = (tmp_path / "runs" / "b" / "report" / "summary.md").read_text()
    assert "1 baseline(s) could not be scored in this run" in text
    assert "every baseline scored" not in text


def test_ctrl_c_stop_exits_130_with_the_resume_line_and_no_abort(shoal_cli, tmp_path):
    """An orderly stop (first Ctrl-C) says how to continue; 'aborted' is for an abort."""
    from test_runner import _events, _weight_of_one

    sources = tp.write_sources(tmp_path / "src")
    cfg = tp.toy_config(sources, budget={"evaluations": 16})
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(cfg))
    code, _, _ = shoal_cli(["evolve", "full.yaml", "--run-dir", "full", "--no-progress"], tmp_path)
    assert code == 0
    at = _weight_of_one(_events(tmp_path / "full")[5]["recipe"])  # a candidate of batch 2
    cfg["tasks"]["fitness"] = tp.interrupting_fitness(at)
    (tmp_path / "int.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = shoal_cli(
        ["evolve", "int.yaml", "--run-dir", "int", "--no-progress"], tmp_path
    )
    assert code == 130
    assert "continue with: shoal evolve --resume --run-dir int" in out
    assert "aborted" not in err
