"""A Ray cluster address that does not answer is one line within the connect timeout
(``ray.init`` alone retried 127.0.0.1:1 for more than seven minutes)."""

from __future__ import annotations

import socket
import time

import pytest
import toy_problem as tp
import yaml

from shoal.errors import ShoalError
from shoal.executors.ray_executor import check_reachable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_refused_address_names_it() -> None:
    port = _free_port()  # closed again: nothing listens there
    start = time.monotonic()
    with pytest.raises(ShoalError, match=rf"executor.address: cannot reach 127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}", 5.0)
    assert time.monotonic() - start < 5.0


def test_listening_address_and_auto_pass() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}", 5.0)
        check_reachable(f"ray://127.0.0.1:{port}", 5.0)
    check_reachable("auto", 0.1)  # Ray looks the address up itself


def test_silent_address_times_out_naming_the_key(monkeypatch) -> None:
    def silent(address, timeout):
        assert timeout == 0.5
        raise TimeoutError

    monkeypatch.setattr(socket, "create_connection", silent)
    with pytest.raises(ShoalError, match=r"10.0.0.9:6379 did not answer within 0.5 s"):
        check_reachable("10.0.0.9:6379", 0.5)


def test_evolve_with_a_dead_address_is_one_line_and_a_fresh_start_works(
    shoal_cli, tmp_path
) -> None:
    pytest.importorskip("ray")
    sources = tp.write_sources(tmp_path / "src")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tp.toy_config(sources)))
    port = _free_port()
    args = ["evolve", "cfg.yaml", "--run-dir", "run", "--no-progress"]
    code, _, err = shoal_cli(
        [*args, "--executor", "ray", "--set", f"executor.address=127.0.0.1:{port}"], tmp_path
    )
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], err
    # the failed start evaluated nothing, so the corrected command starts afresh
    code, _, err = shoal_cli([*args, "--set", "budget.evaluations=4"], tmp_path)
    assert code == 0, err
