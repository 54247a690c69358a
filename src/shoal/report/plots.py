"""The report's plots, drawn with matplotlib (Agg) from a run's events.

- ``fitness.png``: every candidate's fitness (mean over fitness tasks) against evaluations,
  with the running best;
- ``tasks.png``: the running best candidate's per-task means, and the final best's mean
  per task on every split (fitness and test), with the baselines if scored;
- ``parameters.png``: the numeric recipe parameters that varied most, against evaluations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shoal.report.data import RunData, numeric_leaves

__all__ = ["plot_fitness", "plot_parameters", "plot_tasks"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _running_best(events: list[dict[str, Any]]) -> list[int]:
    """Index (into events) of the best-so-far candidate after each event."""
    out, best, arg = [], -np.inf, 0
    for i, e in enumerate(events):
        if e["fitness"] > best:
            best, arg = e["fitness"], i
        out.append(arg)
    return out


def _stage_marks(ax: Any, data: RunData) -> None:
    seen: set[Any] = set()
    for e in data.events:
        if e["stage"] not in seen:
            seen.add(e["stage"])
            if e["stage"] is not None and e["step"] > 0:
                ax.axvline(e["step"], color="grey", ls=":", lw=1)
                ax.text(e["step"], ax.get_ylim()[1], f" {e['stage']}", va="top", fontsize=8)


def plot_fitness(data: RunData, path: Path) -> None:
    """Candidates' fitness and the running best against evaluations."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [e["step"] for e in data.events]
    y = [e["fitness"] for e in data.events]
    best = _running_best(data.events)
    ax.scatter(x, y, s=6, alpha=0.35, label="candidate")
    ax.plot(x, [y[i] for i in best], color="C3", lw=2, label="best so far")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("fitness (mean over fitness tasks)")
    ax.legend(loc="lower right")
    _stage_marks(ax, data)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tasks(data: RunData, path: Path) -> None:
    """Per-task means of the running best, and the final best on every split."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    best = _running_best(data.events)
    x = [e["step"] for e in data.events]
    tasks = sorted({t for e in data.events for t in e["means"]})
    for t in tasks:
        ax1.plot(x, [data.events[i]["means"].get(t, np.nan) for i in best], label=t)
    ax1.set_xlabel("evaluations")
    ax1.set_ylabel("mean score of the best so far")
    if tasks:
        ax1.legend(fontsize=8)
    bars: dict[str, dict[str, float]] = {}
    scores = (data.summary.get("best") or {}).get("scores") or {}
    for vals in scores.values():
        for task, v in vals.items():
            if task != "mean":
                bars.setdefault("best", {})[task] = v
    for name, split_vals in (data.summary.get("baselines") or {}).items():
        for vals in split_vals.values():
            for task, v in vals.items():
                if task != "mean":
                    bars.setdefault(name, {})[task] = v
    labels = sorted({t for vals in bars.values() for t in vals})
    width = 0.8 / max(1, len(bars))
    for k, (name, vals) in enumerate(bars.items()):
        pos = np.arange(len(labels)) + k * width
        ax2.bar(pos, [vals.get(t, 0.0) for t in labels], width, label=name)
    ax2.set_xticks(np.arange(len(labels)) + 0.4 - width / 2)
    ax2.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel("mean score")
    ax2.set_title("final best (all splits)")
    if bars:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_parameters(data: RunData, path: Path, most: int = 12) -> None:
    """Traces of the ``most`` recipe parameters with the largest spread."""
    plt = _plt()
    rows = [numeric_leaves(e["recipe"]) for e in data.events]
    keys = sorted({k for r in rows for k in r})
    spread = {k: float(np.nanstd([r.get(k, np.nan) for r in rows])) for k in keys}
    chosen = sorted(keys, key=lambda k: -spread[k] if np.isfinite(spread[k]) else 0.0)[:most]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [e["step"] for e in data.events]
    for k in chosen:
        ax.plot(x, [r.get(k, np.nan) for r in rows], ".", ms=3, label=k)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("parameter value")
    if chosen:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no numeric recipe parameters", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
