"""The Ray executor on a real local Ray instance gives the serial results."""

from __future__ import annotations

import pytest
import toy_problem as tp

from shoal.search.run_folder import RunFolder
from shoal.search.runner import evolve

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_equals_serial_and_replaces_a_dead_actor(tmp_path):
    sources = tp.write_sources(tmp_path / "src")
    cfg = tp.toy_config(sources, budget={"evaluations": 8})
    cfg["algorithm"] = {"name": "toy-keeper", "population": 4}
    cfg["executor"] = {"type": "ray", "workers": 2}
    evolve(cfg, tmp_path / "serial", executor="serial")
    marker = tmp_path / "marker"  # the fitness task kills its actor the first time
    cfg["tasks"]["fitness"] = tp.dying_fitness(marker)
    result = evolve(
        cfg,
        tmp_path / "ray",
        ray_init={"num_cpus": 2, "include_dashboard": False},
    )
    assert result.status == "completed"
    assert tp.run_events(tmp_path / "ray") == tp.run_events(tmp_path / "serial")
    workers = {e["worker"] for e in RunFolder(tmp_path / "ray").events.read()}
    assert marker.exists() and workers and all(w.startswith("ray-actor-") for w in workers)
    assert "ray-actor-3" in workers  # the replacement of the actor that died
    assert not ray.is_initialized()  # the executor shut down the instance it started
