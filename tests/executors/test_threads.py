"""The thread chooser: timed choices against hand-made timings, and runs equal at any count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from shoal.executors import threads
from shoal.executors.threads import ThreadChooser
from shoal.search.runner import evolve

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "m2n2-digits-scratch.yaml"


class _Host:
    """A fake clock whose candidates take ``cost(threads while scoring, index)`` seconds."""

    def __init__(self, cost) -> None:
        self.cost, self.now, self.threads, self.ticks = cost, 0.0, None, 0

    def clock(self) -> float:
        return self.now

    def apply(self, count: int) -> None:
        self.threads = count

    def run(self, chooser: ThreadChooser, candidates: int) -> None:
        for _ in range(candidates):
            chooser.tick()
            assert self.threads == 1  # building: always the first count
            with chooser.scoring():
                self.now += self.cost(self.threads, self.ticks)
            assert self.threads == 1
            self.ticks += 1


def _chooser(host: _Host, **kw) -> ThreadChooser:
    opts = {"window": 4, "settle": 1, "patience": 8, "max_patience": 32, **kw}
    return ThreadChooser((1, 2), clock=host.clock, apply=host.apply, **opts)


def test_the_faster_count_wins_and_stays() -> None:
    host = _Host(lambda t, i: 1.0 if t == 1 else 0.6)
    chooser = _chooser(host)
    host.run(chooser, 200)
    assert chooser.chosen == chooser.current == 2
    # after the win, trials of 1 thread come back every 8 candidates (patience reset) and
    # lose, so the waits grow: 8, 16, 32, 32, ...
    assert chooser.patience == 32
    assert chooser.used[2] > 150


def test_a_slower_count_is_tried_ever_more_rarely() -> None:
    host = _Host(lambda t, i: 1.0 if t == 1 else 3.0)
    chooser = _chooser(host, max_patience=1024)
    host.run(chooser, 600)
    assert chooser.chosen == chooser.current == 1
    # a trial scores settle + window = 5 candidates at 2 threads; patience 8 → 16 → ...
    # after each lost trial, each followed by a window refilled at 1 thread
    assert chooser.used[2] % 5 == 0
    assert 4 <= chooser.used[2] // 5 <= 6
    assert chooser.patience == 2 ** (3 + chooser.used[2] // 5)


def test_stalls_count_though_most_candidates_are_quick() -> None:
    """Two threads on a busy host: most candidates quicker, one in four stalled. The mean
    sees the stalls (a median would pick two threads and lose throughput)."""
    host = _Host(lambda t, i: 1.0 if t == 1 else (0.8 if i % 4 else 4.0))
    chooser = _chooser(host, window=8)
    host.run(chooser, 300)
    assert chooser.chosen == 1


def test_one_long_pause_does_not_decide() -> None:
    """A checkpoint's pause falls in one interval: the longest is left out of the mean.
    Candidates 7–11 try two threads (one settling, four measured); the pause hits the
    second measured one, and two threads still win."""
    host = _Host(lambda t, i: 50.0 if i == 9 else 1.0 if t == 1 else 0.9)
    chooser = _chooser(host)
    host.run(chooser, 13)
    assert chooser.chosen == 2


def test_a_host_that_changes_is_followed() -> None:
    """Quiet (two threads faster), then busy (two threads slower): the choice follows."""
    host = _Host(lambda t, i: (0.6 if t == 2 else 1.0) if i < 300 else (3.0 if t == 2 else 1.0))
    chooser = _chooser(host)
    host.run(chooser, 300)
    assert chooser.chosen == 2
    host.run(chooser, 200)
    assert chooser.chosen == 1


def test_bad_settings_are_refused() -> None:
    for counts in ((), (1, 1), (0, 2)):
        with pytest.raises(ValueError, match="distinct"):
            ThreadChooser(counts, apply=lambda n: None)
    with pytest.raises(ValueError, match="patience"):
        ThreadChooser((1, 2), patience=10, max_patience=5, apply=lambda n: None)


def test_cores_and_omp_num_threads_cap_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """One or two threads, never more (images often set OMP_NUM_THREADS to every core)."""
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    for value, counts in (("16", (1, 2)), ("2", (1, 2)), ("1", (1,)), ("0", (1, 2)), ("x", (1, 2))):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert ThreadChooser.for_host(apply=lambda n: None).counts == counts, value
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert ThreadChooser.for_host(apply=lambda n: None).counts == (1, 2)
    monkeypatch.setattr(threads, "available_cores", lambda: 1)
    assert ThreadChooser.for_host(apply=lambda n: None).counts == (1,)


def _run(tmp_path: Path, name: str) -> tuple[list, dict, dict[str, bytes]]:
    """What a run decided and made: each event's recipe, seed and scores, the algorithm's
    state, the bytes of every file of ``best/``."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    cfg["budget"] = {"evaluations": 400}
    cfg["progress"] = False
    run = tmp_path / name
    evolve(cfg, run)
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    state = json.loads((run / "state.json").read_text())["algorithm"]
    best = {f.name: f.read_bytes() for f in sorted((run / "best").iterdir()) if f.is_file()}
    assert any(name.endswith(".safetensors") for name in best)
    return [(e["recipe"], e["seed"], e["means"]) for e in events], state, best


def test_a_run_is_the_same_at_one_thread_and_switching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Digits M2N2 at one thread against a worker that scores at one and two threads in
    turn, switching every few candidates: the same recipes, scores, archive and model."""
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        want = _run(tmp_path, "one")
        made: list[ThreadChooser] = []

        def switching(**kw) -> ThreadChooser:
            # patience 1 and a clock that favours whichever count is on trial: a switch
            # every few candidates
            ticks = iter(range(10**9))
            made.append(
                ThreadChooser(
                    (1, 2),
                    window=2,
                    settle=0,
                    patience=1,
                    max_patience=1,
                    clock=lambda: -(float(next(ticks)) ** 1.0001),
                )
            )
            return made[-1]

        monkeypatch.setattr(ThreadChooser, "for_host", staticmethod(switching))
        got = _run(tmp_path, "switching")
        assert made and made[0].used[1] > 50 and made[0].used[2] > 50
        assert got == want
    finally:
        torch.set_num_threads(before)


def test_only_linear_models_get_the_choice() -> None:
    """A diffusion U-Net's outputs change with the thread count: models of other layers
    than linear ones and element-wise activations keep one thread."""
    from torch import nn

    from shoal.executors.threads import same_at_any_count
    from shoal.testbed.images import digits_mlp

    assert same_at_any_count(digits_mlp())
    assert same_at_any_count(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.GELU()))
    assert not same_at_any_count(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()))
    assert not same_at_any_count(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))


def test_a_small_conv_model_keeps_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    from shoal.executors.work import WorkerSpec
    from shoal.executors.worker import Worker

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    loader = {
        "type": "callable",
        "target": "torch.nn:Conv2d",
        "options": {"in_channels": 1, "out_channels": 2, "kernel_size": 3},
    }
    before = torch.get_num_threads()
    try:
        worker = Worker(WorkerSpec(loader=loader, models={}, base_model=None, tasks=[]))
        assert worker.flat is not None  # built as one vector, but
        assert worker.threads is not None and worker.threads.counts == (1,)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_worker_gives_back_the_thread_count_it_found() -> None:
    """A worker sets the process's torch threads (spec.threads, or one for a small model
    choosing its own); close() restores what was there before it."""
    from shoal.executors.work import WorkerSpec
    from shoal.executors.worker import Worker

    loader = {
        "type": "callable",
        "target": "torch.nn:Linear",
        "options": {"in_features": 4, "out_features": 2},
    }
    before = torch.get_num_threads()
    try:
        for threads, want in [(3, 3), (None, 1)]:
            torch.set_num_threads(2)
            spec = WorkerSpec(loader=loader, models={}, base_model=None, tasks=[], threads=threads)
            worker = Worker(spec)
            assert torch.get_num_threads() == want
            worker.close()
            assert torch.get_num_threads() == 2
        torch.set_num_threads(2)  # a worker whose model cannot load leaves the count too
        broken = {"type": "callable", "target": "torch.nn:NoSuchLayer"}
        with pytest.raises(Exception, match="NoSuchLayer"):
            Worker(WorkerSpec(loader=broken, models={}, base_model=None, tasks=[], threads=3))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
