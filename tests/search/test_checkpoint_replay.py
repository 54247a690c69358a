"""Checkpoints every few seconds, replay after a kill: the run ends as if never killed.

The run loop writes its state every ``checkpoint_seconds``, not after every batch; a run
killed in between replays the batches since its last checkpoint on ``--resume``. Here a
real ``shoal evolve`` process of M2N2 on digits (flat builds, the model store in use) is
SIGKILLed at seeded random moments, on the serial and the process executor, and resumed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from shoal.search.run_folder import RunFolder
from shoal.search.runner import evolve

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "m2n2-digits-scratch.yaml"
EVALUATIONS = 300


def _config(tmp_path: Path, executor: str, seconds: float) -> Path:
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["algorithm"]["archive_size"] = 6
    cfg["budget"] = {"evaluations": EVALUATIONS}
    cfg["executor"] = {"type": executor, "workers": 2}
    cfg["checkpoint_seconds"] = seconds
    cfg["progress"] = False
    path = tmp_path / f"{executor}-{seconds}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _decisions(run: Path) -> list[tuple]:
    """What a run decided and measured: recipes, seeds, scores (not timings or workers)."""
    return [(e["recipe"], e["seed"], e["means"], e["error"]) for e in RunFolder(run).events.read()]


def _saved_evaluations(run: Path) -> int:
    try:
        return int(json.loads((run / "state.json").read_text())["runner"]["evaluations"])
    except (OSError, ValueError, KeyError):
        return 0


def _kill_after(args: list[str], run: Path, evaluations: int) -> None:
    """Run ``shoal ARGS`` and SIGKILL it once a checkpoint holds ``evaluations``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli.main", *args, "--run-dir", str(run), "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if _saved_evaluations(run) >= evaluations:
                break
            time.sleep(0.002)
        assert proc.poll() is None, "the run ended before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert _saved_evaluations(run) < EVALUATIONS


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run never killed, serial, a checkpoint after every batch."""
    tmp = tmp_path_factory.mktemp("whole")
    run = tmp / "run"
    evolve(_config(tmp, "serial", 0), run)
    return run


@pytest.mark.parametrize("executor", ["serial", "process"])
def test_killed_at_random_moments_and_resumed_ends_as_the_whole_run(
    tmp_path, uninterrupted, executor
) -> None:
    rng = np.random.default_rng(15)  # seeded kill points: after the k-th evaluation saved
    first, second = sorted(int(k) for k in rng.integers(20, EVALUATIONS - 100, size=2))
    config = _config(tmp_path, executor, 0.05)
    run = tmp_path / "run"
    _kill_after(["evolve", str(config)], run, first)
    _kill_after(["evolve", "--resume"], run, second)  # killed again, while resumed
    evolve(None, run, resume=True)
    assert _decisions(run) == _decisions(uninterrupted)
    whole = json.loads((uninterrupted / "summary.json").read_text())["best"]
    cut = json.loads((run / "summary.json").read_text())["best"]
    assert (cut["recipe"], cut["scores"]) == (whole["recipe"], whole["scores"])
    for name in ("model.safetensors", "shoal_recipe.yaml"):  # the recipe's key order too
        assert (run / "best" / name).read_bytes() == (uninterrupted / "best" / name).read_bytes()
    assert not [p.name for p in run.rglob(".*") if p.name != ".lock"]  # nothing left over


def test_the_checkpoint_interval_does_not_change_the_run(tmp_path, uninterrupted) -> None:
    """Every batch (0, the fixture), every 0.05 s, once at the end (an hour): one result."""
    for seconds in (0.05, 3600):
        run = tmp_path / f"every-{seconds}"
        evolve(_config(tmp_path, "serial", seconds), run)
        assert _decisions(run) == _decisions(uninterrupted)


def test_ray_runs_the_same_search_as_serial(tmp_path, uninterrupted) -> None:
    pytest.importorskip("ray")
    cfg = yaml.safe_load(_config(tmp_path, "ray", 1.0).read_text())
    cfg["budget"] = {"evaluations": 40}
    evolve(cfg, tmp_path / "ray", ray_init={"num_cpus": 2, "include_dashboard": False})
    assert _decisions(tmp_path / "ray") == _decisions(uninterrupted)[:40]


def test_checkpoint_seconds_given_on_resume_is_used(tmp_path, monkeypatch) -> None:
    from shoal.search import runner

    used: list[float] = []
    real = runner._Checkpoint.__init__

    def spy(self, folder, algo, store, counters, seconds) -> None:  # type: ignore[no-untyped-def]
        used.append(seconds)
        real(self, folder, algo, store, counters, seconds)

    monkeypatch.setattr(runner._Checkpoint, "__init__", spy)
    run = tmp_path / "run"
    config = yaml.safe_load(_config(tmp_path, "serial", 0).read_text())
    evolve({**config, "budget": {"evaluations": 20}}, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["budget"] = {"evaluations": 40}  # a finished run continued with a larger budget
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "summary.json").unlink()
    evolve(None, run, resume=True, overrides=["checkpoint_seconds=7.5"])
    assert used == [0.0, 7.5]
    assert yaml.safe_load((run / "config.yaml").read_text())["checkpoint_seconds"] == 0.0


def test_the_state_keeps_the_key_order_of_recipes(tmp_path) -> None:
    """A resumed run's best recipe comes from the state; written sorted, its
    shoal_recipe.yaml would differ from an uninterrupted run's (mutation before models)."""
    folder = RunFolder(tmp_path)
    recipe = {"merge_method": "splitpoint", "parameters": {"split": 0.5}, "mutation": 0.01}
    folder.write_state({"algorithm": {"recipes": [recipe]}})
    saved = folder.read_state()
    assert saved is not None
    assert list(saved["algorithm"]["recipes"][0]) == ["merge_method", "parameters", "mutation"]
