"""``shoal evolve`` killed for real (SIGKILL, SIGTERM) in the middle of a run, then
``--resume``: the run ends as the uninterrupted one does, event for event and in best/.

tests/search/test_runner.py stands for the kill with an exception raised at a chosen
point; here the OS ends a separate process at whatever moment the signal lands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import toy_problem as tp
import yaml

from shoal.search.config import RunConfig

HERE = Path(__file__).resolve().parent

SLOW_TASK = """
import time
from toy_problem import score

def slow_score(model, scored):
    time.sleep(0.05)
    with open(scored, "a") as fh:  # a line a candidate scored, for the test to watch
        fh.write("scored\\n")
    return score(model)
"""

# the CLI's entry point with the toy algorithms registered
DRIVER = (
    "import sys, toy_problem; from shoal.cli.main import main; "
    "sys.argv = ['shoal', *sys.argv[1:]]; main()"
)


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", DRIVER, *args, "--no-progress"]


def _env(tmp_path: Path) -> dict[str, str]:
    paths = [str(tmp_path), str(HERE), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "term"])
def test_evolve_killed_mid_run_resumes_to_the_uninterrupted_result(
    tmp_path: Path, signum: int
) -> None:
    (tmp_path / "slowtask.py").write_text(SLOW_TASK)
    cfg = tp.toy_config(tp.write_sources(tmp_path / "src"), budget={"evaluations": 24})
    cfg["algorithm"] = {"name": "toy-keeper", "population": 4}  # the store too
    scored = tmp_path / "scored"
    cfg["tasks"]["fitness"] = tp.function_fitness("slowtask:slow_score", scored=str(scored))
    if "checkpoint_seconds" in RunConfig.model_fields:  # durable after every batch
        cfg["checkpoint_seconds"] = 0
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = _env(tmp_path)
    full = subprocess.run(
        _cmd("evolve", "cfg.yaml", "--run-dir", "full"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert full.returncode == 0, full.stderr

    proc = subprocess.Popen(
        _cmd("evolve", "cfg.yaml", "--run-dir", "cut"),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if len(scored.read_text().splitlines()) >= 34:
                break  # 24 candidates scored by the full run, then the third batch of six
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before the signal"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert not (tmp_path / "cut" / "summary.json").exists()  # the run did not end
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, err
        assert err.strip().splitlines()[-1] == "aborted"

    again = subprocess.run(
        _cmd("evolve", "--resume", "--run-dir", "cut"),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert tp.run_events(tmp_path / "cut") == tp.run_events(tmp_path / "full")
    best_full = json.loads((tmp_path / "full" / "summary.json").read_text())["best"]
    best_cut = json.loads((tmp_path / "cut" / "summary.json").read_text())["best"]
    assert best_cut["recipe"] == best_full["recipe"] and best_cut["scores"] == best_full["scores"]
    assert _tree(tmp_path / "cut" / "best") == _tree(tmp_path / "full" / "best")
    leftovers = [p.name for p in (tmp_path / "cut").rglob(".*") if p.name != ".lock"]
    assert leftovers == []
