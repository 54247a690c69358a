"""The process-pool executor gives the serial results, and survives a dying worker."""

from __future__ import annotations

import json

import pytest
import toy_problem as tp

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
