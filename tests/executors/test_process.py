"""The process-pool executor gives the serial results, and survives a dying worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import toy_problem as tp
import yaml

from shoal.search.run_folder import RunFolder
from shoal.search.runner import evolve


@pytest.mark.slow
def test_process_equals_serial_with_store_and_survives_worker_death(tmp_path):
    sources = tp.write_sources(tmp_path / "src")
    cfg = tp.toy_config(sources, budget={"evaluations": 12})
    cfg["algorithm"] = {"name": "toy-keeper", "population": 4}
    cfg["executor"] = {"type": "process", "workers": 2}
    evolve(cfg, tmp_path / "serial", executor="serial")
    # a fitness task that kills its worker process the first time it runs
    marker = tmp_path / "marker"
    dying = json.loads(json.dumps(cfg))
    dying["tasks"]["fitness"] = tp.dying_fitness(marker)
    result = evolve(dying, tmp_path / "proc")
    assert marker.exists()  # a worker did die
    assert result.status == "completed"
    assert tp.run_events(tmp_path / "proc") == tp.run_events(tmp_path / "serial")
    workers = {e["worker"] for e in RunFolder(tmp_path / "proc").events.read()}
    assert all(w != "serial" for w in workers)
    # the store holds exactly what the algorithm still references (+ the best)
    state = json.loads((tmp_path / "proc" / "state.json").read_text())
    best = json.loads((tmp_path / "proc" / "summary.json").read_text())["best"]
    from shoal.search.algorithms.base import store_key

    kept = {p.stem for p in (tmp_path / "proc" / "store").glob("*.safetensors")}
    assert kept == {store_key(best["recipe"])}
    assert state["runner"]["evaluations"] == 12


_RUN_SCRIPT = """
import sys
from pathlib import Path

import yaml

from shoal.search.runner import evolve

if __name__ == "__main__":
    evolve(yaml.safe_load(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_leave_when_their_run_is_killed(tmp_path):
    """kill -9 of a run with the process executor takes its workers with it: an idle
    pool worker would otherwise wait for good, holding its model."""
    pids = tmp_path / "pids"
    pids.mkdir()
    cfg = tp.toy_config(tp.write_sources(tmp_path / "src"), budget={"evaluations": 100_000})
    cfg["tasks"]["fitness"] = tp.function_fitness("toy_problem:score_noting_pid", pid_dir=str(pids))
    cfg["executor"] = {"type": "process", "workers": 2}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "run.py").write_text(_RUN_SCRIPT)
    run = subprocess.Popen(
        [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "cfg.yaml"), str(tmp_path / "r")],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
            assert run.poll() is None, "the run ended before both workers scored"
            time.sleep(0.2)
        workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 2 and all(map(_alive, workers))
    finally:
        run.kill()  # SIGKILL: no handler, no pool shutdown
        run.wait()
    deadline = time.monotonic() + 30
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, workers))
