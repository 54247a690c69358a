"""Torch's thread count for scoring a small model, chosen while the run goes, by timing it.

A small model's matmuls gain from a second thread on a quiet host and collapse when
another process holds the other core: OpenMP's threads spin, waiting for each other.
M2N2 on digits (``examples/m2n2-digits-scratch.yaml``, 2 cores, 2026-12-06) ran at
570–586 evaluations/s on one thread and 736–749/s on two on a quiet host, but at 148/s
on two with the other core busy. No fixed count is right on a shared host, so a serial
worker times itself: :class:`ThreadChooser` keeps the count that gives the shortest
time between candidates and, now and then, tries each other one for a few candidates —
soon again after a trial won, later and later after trials lost.

The count applies while a candidate is scored (:meth:`ThreadChooser.scoring`); building
it runs on one thread, as it did before the chooser: a float64 dot product of the SLERP
angles comes out of MKL with other rounding on two threads, while the digits MLP's
logits are the same on one and two. Only models of linear layers and element-wise
activations (:func:`same_at_any_count`) get the choice; a diffusion U-Net's outputs
change with the count, so such a model keeps one thread. So the count changes the speed
only (tests/executors/test_threads.py runs a search that switches against one that does
not and compares events, state and the best model's bytes). ``OMP_NUM_THREADS=1`` in the
environment keeps one thread throughout.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["ThreadChooser", "available_cores", "same_at_any_count"]

#: module types whose outputs were measured not to depend on torch's thread count: the
#: digits MLP's logits were bit-identical at one and two threads over 300 weight draws,
#: while a diffusion U-Net's outputs (convolutions, group norms) differed in 20 of 20
_SAME_AT_ANY_COUNT = (
    nn.Sequential,
    nn.ModuleList,
    nn.Linear,
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
)


def same_at_any_count(module: nn.Module) -> bool:
    """Whether ``module`` is built only of linear layers, element-wise activations and
    containers: the models whose scores a second thread leaves as they are (see
    :data:`_SAME_AT_ANY_COUNT`); any other keeps one thread throughout."""
    return all(type(m) in _SAME_AT_ANY_COUNT for m in module.modules())


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity mask
        return os.cpu_count() or 1


class ThreadChooser:
    """Keeps the fastest of a few torch thread counts, by the time between candidates.

    Call :meth:`tick` once per candidate, before building it, and score it inside
    :meth:`scoring`; the first count is the one in force the rest of the time. The first
    trial of another count comes after ``2 × window`` candidates. The interval since the
    previous tick (build, score and the loop's own work) is filed under the count in
    force. A count's speed is the mean of its last ``window`` intervals, the longest
    left out: a checkpoint's pause does not sway it, while the stalls of threads that
    wait for a busy core do (a median hid them: on a busy host two threads had the
    lower median and half the throughput).

    Args:
        counts: Thread counts to choose among; the first is used from the start.
        window: Intervals that make one measurement.
        settle: Intervals dropped after each switch (a new OpenMP team starts up).
        patience: Candidates at the chosen count before the next trial; doubled after
            each trial that loses (up to ``max_patience``), reset after one that wins.
        max_patience: The longest wait between trials.
        clock: Seconds, monotonic (tests pass a fake one).
        apply: Sets the thread count (default :func:`torch.set_num_threads`).
    """

    def __init__(
        self,
        counts: Sequence[int] = (1, 2),
        *,
        window: int = 32,
        settle: int = 2,
        patience: int = 256,
        max_patience: int = 8192,
        clock: Callable[[], float] = time.perf_counter,
        apply: Callable[[int], None] = torch.set_num_threads,
    ) -> None:
        if not counts or len(set(counts)) != len(counts) or min(counts) < 1:
            raise ValueError(f"thread counts must be distinct and ≥ 1, got {list(counts)}")
        if window < 1 or settle < 0 or not 1 <= patience <= max_patience:
            raise ValueError("window ≥ 1, settle ≥ 0 and 1 ≤ patience ≤ max_patience")
        self.counts = tuple(counts)
        self.window, self.settle = window, settle
        self.base_patience, self.max_patience = patience, max_patience
        self.patience = patience
        self._clock, self._apply = clock, apply
        self._times: dict[int, deque[float]] = {c: deque(maxlen=window) for c in self.counts}
        self._last: float | None = None
        self._skip = 0
        self._next = 0  # how many trials have started: picks the next of the other counts
        self.chosen = self.counts[0]  # the count that won the last comparison
        self.current = self.chosen  # the count scoring uses (differs during a trial)
        self._wait = window if len(self.counts) > 1 else -1  # candidates before a trial
        #: candidates scored at each count
        self.used: Counter[int] = Counter()
        self._apply(self.counts[0])

    @classmethod
    def for_host(cls, **kwargs: object) -> ThreadChooser:
        """A chooser between one thread and two, where this process may use two cores and
        ``OMP_NUM_THREADS`` (a cap here: images often set it to every core) allows two."""
        cores = available_cores()
        cap = os.environ.get("OMP_NUM_THREADS", "").strip()
        if cap.isdigit() and int(cap) >= 1:
            cores = min(cores, int(cap))
        return cls((1, 2) if cores >= 2 else (1,), **kwargs)  # type: ignore[arg-type]

    @contextmanager
    def scoring(self) -> Iterator[None]:
        """Score a candidate at the current count; the first count again afterwards."""
        if self.current == self.counts[0]:
            yield
            return
        self._apply(self.current)
        try:
            yield
        finally:
            self._apply(self.counts[0])

    def tick(self) -> None:
        """Note the time since the last candidate; switch counts when a step calls for it."""
        now = self._clock()
        if self._last is not None:
            if self._skip:
                self._skip -= 1
            else:
                self._times[self.current].append(now - self._last)
        self._last = now
        if self._wait >= 0:
            if self.current != self.chosen:  # a trial: decide once it has a full window
                if len(self._times[self.current]) == self.window:
                    self._decide()
            elif len(self._times[self.chosen]) == self.window:
                self._wait -= 1
                if self._wait <= 0:
                    self._start_trial()
        self.used[self.current] += 1  # the count this candidate will be scored at

    def speed(self, count: int) -> float | None:
        """Mean seconds per candidate measured at ``count``, its longest interval left out
        (``None``: not measured)."""
        times = self._times[count]
        if not times:
            return None
        if len(times) == 1:
            return times[0]
        return (sum(times) - max(times)) / (len(times) - 1)

    def _start_trial(self) -> None:
        others = [c for c in self.counts if c != self.chosen]
        trial = others[self._next % len(others)]
        self._next += 1
        self._times[trial].clear()  # a new measurement: the host may have changed
        self._switch(trial)

    def _decide(self) -> None:
        trial, chosen = self.speed(self.current), self.speed(self.chosen)
        assert trial is not None and chosen is not None
        if trial < chosen:
            self.chosen = self.current
            self.patience = self.base_patience
        else:
            self.patience = min(2 * self.patience, self.max_patience)
            self._switch(self.chosen)
            self._times[self.chosen].clear()  # measured again before the next trial
        self._wait = self.patience

    def _switch(self, count: int) -> None:
        self.current = count
        self._skip = self.settle
