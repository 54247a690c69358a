"""SIGTERM to ``shoal evolve`` under a local Ray instance: ``aborted``, exit 130, and every
process of the instance shoal started is gone when shoal exits (issue 18 item 10).

``ray.init`` replaces the CLI's SIGTERM handler with one that exits with status 1 after
a stack dump from Ray's C++ core; the executor puts the CLI's back.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import toy_problem as tp
import yaml

pytest.importorskip("ray")

SLOW_TASK = """
import os, time
from pathlib import Path
from toy_problem import score

def slow_score(model, marker):
    Path(marker).write_text(str(os.getpid()))
    time.sleep(120)
    return score(model)
"""

DRIVER = (
    "import sys, toy_problem; from shoal.cli.main import main; "
    "sys.argv = ['shoal', *sys.argv[1:]]; main()"
)


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigterm_shuts_down_the_local_ray_instance(tmp_path: Path) -> None:
    (tmp_path / "slowtask.py").write_text(SLOW_TASK)
    marker = tmp_path / "started"
    cfg = tp.toy_config(tp.write_sources(tmp_path / "src"), budget={"evaluations": 2})
    cfg["tasks"]["fitness"] = tp.function_fitness("slowtask:slow_score", marker=str(marker))
    cfg["executor"] = {"type": "ray", "workers": 1}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    args = ["evolve", "cfg.yaml", "--run-dir", "run", "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    ray_pids: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), proc.communicate(timeout=30)[1]
        ray_pids = _descendants(proc.pid)  # gcs, raylet, agents, the actor scoring
        actor = int(marker.read_text())
        assert actor in ray_pids and len(ray_pids) >= 4
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for pid in ray_pids:  # whatever a failed run left behind
            if _running(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "aborted"
    assert "SIGTERM received" not in err and "Traceback" not in err
    left = sorted(pid for pid in ray_pids if _running(pid))
    assert left == [], f"still running after shoal exited: {left}"
