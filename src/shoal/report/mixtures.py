"""CycleQD's candidates as mixtures of its experts, and the triangle they fill.

A CycleQD child is a ``task_arithmetic`` of its two parents with weights summing to one,
each parent an expert or an earlier candidate (``store:<key>``), so every candidate of a
run seeded with the experts alone is θ_base + Σ_k w_k τ_k with w on the simplex — its SVD
mutation steps left out (they add along the quality expert's singular directions and are
not a weight on the experts). The final aggregate is the same kind of recipe over the
elites. Following each recipe's references back through the event log, in order, gives
every candidate's w; for three experts the report draws them in a triangle
(``mixtures.png``): where the archives' elites lie, how well they do, and where the
aggregate lands.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shoal.report.archives import cycleqd_state
from shoal.search.algorithms.base import model_ref, store_ref
from shoal.search.run_folder import RunFolder

__all__ = ["Mixtures", "expert_mixtures", "frame_triangle", "plot_mixtures", "triangle_xy"]

#: where each of three experts sits in the plane: an equilateral triangle
CORNERS = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 3**0.5 / 2]])


@dataclass
class Mixtures:
    """Every candidate of a CycleQD run as weights on its experts' task vectors.

    Attributes:
        tasks: The skill tasks, in cycling order; weight ``k`` is on task ``k``'s expert.
        experts: The expert models, in task order.
        weights: Model reference (an expert's name or ``store:<key>``) -> its weights.
        candidates: One row per logged candidate, in order: weights, training mean over
            the tasks, and whether it is an elite of the final archives.
        aggregate: The final aggregate's weights, once it was scored (else ``None``).
    """

    tasks: list[str]
    experts: list[str]
    weights: dict[str, list[float]]
    candidates: list[tuple[list[float], float, bool]]
    aggregate: list[float] | None


def _weights(recipe: dict[str, Any], known: dict[str, list[float]], k: int) -> list[float] | None:
    """A recipe's weights on the experts, or ``None`` if it names anything else."""
    if "model" in recipe:
        return known.get(recipe["model"])
    params = recipe.get("parameters") or {}
    if recipe.get("merge_method") != "task_arithmetic" or params.get("normalize"):
        return None
    lam = float(params.get("lambda", 1.0))
    out = np.zeros(k)
    for m in recipe["models"]:
        parent = known.get(m["model"])
        if parent is None:
            return None
        out += lam * float(m["parameters"]["weight"]) * np.asarray(parent)
    return out.tolist()


def expert_mixtures(folder: RunFolder) -> Mixtures | None:
    """Place every candidate of a CycleQD run (or stage) on its experts' simplex.

    Returns ``None`` for other runs, and for a CycleQD run with a seed that is not a
    mixture of the experts (an earlier stage's result, say), whose descendants are not.
    """
    state = cycleqd_state(folder)
    if state is None:
        return None
    tasks = [str(t) for t in state["tasks"]]
    experts = [str(state["options"]["experts"][t]) for t in tasks]
    k = len(experts)
    known = {e: [float(e == x) for x in experts] for e in experts}
    candidates = []
    elites = {e["data"]["ref"] for a in state["archives"] for e in a["elites"]}
    told = state.get("aggregate") or {}
    aggregate_key = store_ref(told["recipe"]) if told.get("recipe") else None
    for event in folder.saved_events():
        w = _weights(event["recipe"], known, k)
        if w is None:
            return None
        ref = model_ref(event["recipe"])
        known[ref] = w
        if ref != aggregate_key and not event.get("error"):  # a failed one is no model
            means = [float(event["means"].get(t) or 0.0) for t in tasks] if event["means"] else []
            candidates.append((w, float(np.mean(means)) if means else 0.0, ref in elites))
    aggregate = known.get(aggregate_key) if aggregate_key else None
    return Mixtures(tasks, experts, known, candidates, aggregate)


def triangle_xy(weights: Any) -> np.ndarray:
    """Points in the plane of weights on three experts (one row per mixture, or one)."""
    return np.asarray(weights, dtype=float) @ CORNERS


def frame_triangle(ax: Any, names: list[str]) -> None:
    """Name each corner after its expert, leave room for the names, hide the axes."""
    for (x, y), name in zip(CORNERS, names, strict=True):
        ax.annotate(
            name,
            (x, y),
            ha="center",
            va="bottom" if y else "top",
            xytext=(0, 6 if y else -6),
            textcoords="offset points",
        )
    ax.set_xlim(-0.18, 1.18)
    ax.set_ylim(-0.1, 0.95)
    ax.set_axis_off()
    ax.set_aspect("equal")


def plot_mixtures(m: Mixtures, path: Path, stage: str = "") -> None:
    """Draw the candidates of a three-expert run in the triangle of the experts' weights:
    every candidate grey, the final archives' elites coloured by their training mean, the
    aggregate as a red cross (only for K = 3; a caller checks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = triangle_xy([c[0] for c in m.candidates]).reshape(-1, 2)
    elite = np.array([c[2] for c in m.candidates], dtype=bool)
    means = np.array([c[1] for c in m.candidates])
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    ax.fill(*CORNERS.T, color="0.95", zorder=0)
    ax.scatter(xy[~elite, 0], xy[~elite, 1], s=6, color="0.6", label="other candidates", zorder=1)
    dots = ax.scatter(
        xy[elite, 0],
        xy[elite, 1],
        s=18,
        c=100 * means[elite],
        cmap="viridis",
        zorder=2,
        label="elites of the final archives",
    )
    fig.colorbar(dots, ax=ax, pad=0.08, label="elite's training mean over the tasks, %")
    if m.aggregate is not None:
        ax.plot(
            *triangle_xy(m.aggregate),
            "x",
            color="red",
            markersize=11,
            markeredgewidth=2.5,
            label="final aggregate",
            zorder=3,
        )
    frame_triangle(ax, m.experts)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    title = "candidates as weights on the experts' task vectors (mutations left out)"
    ax.set_title(f"{stage}: {title}" if stage else title, fontsize=9, pad=22)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
