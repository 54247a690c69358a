"""CycleQD's archives in the report: replayed from the events, drawn as heatmaps and curves.

The state holds only the final archives; their history is rebuilt by inserting every
logged candidate again, in order, with the insertion rule of the run (a cell takes a
candidate when it is empty or holds a strictly worse elite). The seeds come first (the
run's first K evaluations, the experts, then one for each of ``seeds``) and enter together
once all are scored; the final aggregation is left out, as in the run — so the
replayed end equals the saved archives, which a test checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shoal.search.algorithms.qd_archive import GridArchive
from shoal.search.run_folder import RunFolder

__all__ = [
    "ArchiveHistory",
    "archive_history",
    "cycleqd_state",
    "plot_archives",
    "plot_qd_curves",
]


@dataclass
class ArchiveHistory:
    """The archives of one CycleQD run (or stage) over its evaluations.

    Attributes:
        tasks: The skill tasks; archive ``k`` has task ``k`` as its quality and the others,
            in order, as its behaviour axes.
        experts: Task -> the model that is its expert (the run's ``algorithm.experts``).
        seed_qualities: Task -> its expert's quality in that task's archive (train mean).
        archives: The archives after the last logged candidate.
        snapshots: ``(evaluations done, archives)`` at evenly spaced points, the last one
            the end.
        evaluations: Evaluation count after each inserted candidate (for the curves).
        coverage: Per task, the archive's coverage after each inserted candidate.
        best_quality: Per task, the archive's best quality after each inserted candidate.
        qd_score: Per task, the archive's QD score after each inserted candidate.
    """

    tasks: list[str]
    archives: list[GridArchive]
    snapshots: list[tuple[int, list[GridArchive]]]
    experts: dict[str, str] = field(default_factory=dict)
    seed_qualities: dict[str, float] = field(default_factory=dict)
    evaluations: list[int] = field(default_factory=list)
    coverage: dict[str, list[float]] = field(default_factory=dict)
    best_quality: dict[str, list[float]] = field(default_factory=dict)
    qd_score: dict[str, list[float]] = field(default_factory=dict)


def _logged_means(event: dict[str, Any], tasks: list[str]) -> list[float] | None:
    """A logged candidate's task means as CycleQD was told them; ``None`` for one that
    failed (it entered no archive) or whose means are not all logged."""
    logged = event.get("means") or {}
    if event.get("error") or any(t not in logged for t in tasks):
        return None
    means = [float(logged[t]) for t in tasks]
    return means if all(map(math.isfinite, means)) else None


def _copy(archives: list[GridArchive]) -> list[GridArchive]:
    return [GridArchive.from_state_dict(a.state_dict()) for a in archives]


def cycleqd_state(folder: RunFolder) -> dict[str, Any] | None:
    """The saved state of a CycleQD run (or stage) once it has archives; else ``None``
    (another algorithm, or the seeds still being scored)."""
    algo = (folder.read_state() or {}).get("algorithm") or {}
    state = algo.get("state") or {}
    if algo.get("algorithm") != "cycleqd" or not state.get("archives"):
        return None
    return dict(state)


def archive_history(folder: RunFolder, snapshots: int = 4) -> ArchiveHistory | None:
    """Replay a CycleQD run's events into its archives; ``None`` for other runs.

    Also ``None`` while the seeds are still being scored (no archive exists yet).
    """
    state = cycleqd_state(folder)
    if state is None:
        return None
    tasks = [str(t) for t in state["tasks"]]
    K = len(tasks)
    empty = [
        GridArchive(int(a["bins"]), [tuple(r) for r in a["ranges"]], float(a["qd_offset"]))
        for a in state["archives"]
    ]
    aggregate = (state.get("aggregate") or {}).get("evaluation")
    events = [e for e in folder.saved_events() if e.get("evaluation") != aggregate]
    archives = _copy(empty)
    experts = dict((state.get("options") or {}).get("experts") or {})
    seed_means = state.get("seed_means") or []  # the experts' first, then any further seeds
    n_seeds = max(len(seed_means), K)
    history = ArchiveHistory(
        tasks,
        archives,
        [],
        experts,
        {t: float(seed_means[k][k]) for k, t in enumerate(tasks) if k < len(seed_means)},
    )
    children = len(events) - n_seeds  # the snapshots are spread over what follows the seeds
    marks = {n_seeds + round(children * (i + 1) / snapshots) for i in range(snapshots)}
    for n, event in enumerate(events, 1):
        means = _logged_means(event, tasks)
        data = {"evaluation": event.get("evaluation")}
        for k, archive in enumerate(archives):
            if means is not None:  # a failure entered no archive
                archive.add_one(means[k], [means[j] for j in range(K) if j != k], data)
        if n < n_seeds:  # the seeds enter together, once all are scored
            continue
        history.evaluations.append(n)
        for t, archive in zip(tasks, archives, strict=True):
            stats = archive.stats()
            history.coverage.setdefault(t, []).append(stats.coverage)
            history.best_quality.setdefault(t, []).append(stats.best_quality)
            history.qd_score.setdefault(t, []).append(stats.qd_score)
        if n in marks:
            history.snapshots.append((n, _copy(archives)))
    return history


def _grid(archive: GridArchive) -> np.ndarray:
    """Qualities on the first two behaviour axes (max over any further axes; NaN: empty),
    as ``imshow`` draws an array: rows along the y axis (behaviour axis 1), columns along
    x (axis 0)."""
    shape = (archive.bins,) * min(archive.dims, 2)
    out = np.full(shape if archive.dims >= 2 else (1, archive.bins), np.nan)
    for cell, elite in archive:
        idx = (cell[1], cell[0]) if archive.dims >= 2 else (0, cell[0])
        if not elite.quality <= out[idx]:  # NaN or lower
            out[idx] = elite.quality
    return out


def plot_archives(history: ArchiveHistory, path: Path, title: str = "") -> None:
    """One row per archive, one heatmap per snapshot: quality over the behaviour axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(history.tasks), len(history.snapshots)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.1 * cols + 0.8, 2.9 * rows), squeeze=False, layout="constrained"
    )
    for k, task in enumerate(history.tasks):
        others = [t for t in history.tasks if t != task]
        grids = [_grid(archives[k]) for _, archives in history.snapshots]
        finite = np.concatenate([g[np.isfinite(g)] for g in grids] + [np.zeros(0)])
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        ranges = history.archives[k].ranges
        extent = (*ranges[0], *(ranges[1] if len(ranges) > 1 else (0.0, 1.0)))
        image = None
        for c, ((n, _), grid) in enumerate(zip(history.snapshots, grids, strict=True)):
            ax = axes[k][c]
            image = ax.imshow(
                grid,
                origin="lower",
                extent=extent,
                aspect="auto",
                cmap="viridis",
                vmin=lo,
                vmax=hi if hi > lo else lo + 1e-9,
                interpolation="nearest",
            )
            ax.set_title(f"quality {task}\nafter {n} evaluations", fontsize=8)
            ax.set_xlabel(others[0], fontsize=8)
            if len(others) > 1:
                ax.set_ylabel(others[1], fontsize=8)
            ax.tick_params(labelsize=7)
        if image is not None:
            fig.colorbar(image, ax=list(axes[k]), label=f"{task} (train mean)", shrink=0.9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_qd_curves(history: ArchiveHistory, path: Path, title: str = "") -> None:
    """Coverage, best quality and QD score of each archive against evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
    for name, series, ax in (
        ("coverage", history.coverage, axes[0]),
        ("best quality (train mean)", history.best_quality, axes[1]),
        ("QD score", history.qd_score, axes[2]),
    ):
        for task in history.tasks:
            ax.plot(history.evaluations, series.get(task, []), label=task, lw=1.2)
        ax.set_xlabel("evaluations")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="archive (quality task)", title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
