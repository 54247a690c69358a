"""How far CycleQD's merges can reach: every mixture of the experts on a simplex grid.

    python bench/cycleqd_simplex.py --testbed .testbed/small [--step 0.1] \\
        [--plot docs/img/cycleqd-simplex.png] [--json .bench/simplex.json]

CycleQD's crossover θ_base + Σ ω_i τ_i / Σ ω_i (METHODS.md §4) keeps the weights of its
parents summing to one, and so does its final softmax aggregate: short of the SVD
mutation's steps (at most ``w_max`` = 10 % of one expert's singular values each), every
model the method makes is a *convex* mixture θ_base + Σ_k w_k τ_k of the experts' task
vectors, w on the simplex. This script builds each mixture on a grid of the simplex
(step 0.1: 66 models for three experts) with shoal's own ``task_arithmetic`` merge, the
recipe the crossover writes, and scores it on the fitness items the search sees (the
first 100 training items a skill), validation and test (150 held-out items a skill).

Printed: the experts, then the mixture a search would pick on the training items, the
one a user would pick on validation, and the best on test — an oracle no method can
beat while choosing on other data — each with its three splits; and how many mixtures
beat the best expert on test. The wall time is printed beside a floor measured in the
same process (3,000 float32 384 × 384 GEMMs on one thread). Runs on the build's pinned
kernels (one thread, AVX2), so the scores are the testbed's own.
"""

from __future__ import annotations

import os

from _evolve_example import PINNED_KERNELS

os.environ.update(PINNED_KERNELS)  # before torch is imported: its kernels read them

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from shoal.merge import merge_into_module
from shoal.testbed import load_testbed
from shoal.testbed.build import expert_name

ROOT = Path(__file__).resolve().parents[1]
#: split -> examples a skill (None: all); train is what CycleQD's fitness tasks score
SPLITS = {"train": 100, "validation": None, "test": None}


def simplex(k: int, steps: int) -> list[tuple[float, ...]]:
    """Every w ≥ 0 with Σ w = 1 whose k entries are multiples of 1/steps."""
    return [tuple(c / steps for c in parts) for parts in _compositions(k, steps)]


def _compositions(k: int, total: int) -> list[tuple[int, ...]]:
    """Every k-tuple of non-negative integers summing to ``total``."""
    if k == 1:
        return [(total,)]
    return [(i, *rest) for i in range(total + 1) for rest in _compositions(k - 1, total - i)]


def _floor() -> float:
    a = torch.randn(384, 384, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for _ in range(3000):
        a @ a
    return time.perf_counter() - t0


def _plot(rows: list[dict], skills: list[str], best_expert: float, path: Path) -> None:
    """A ternary heatmap of the test mean over the simplex (three experts only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.tri as mtri

    corners = [(0.0, 0.0), (1.0, 0.0), (0.5, 3**0.5 / 2)]
    xy = [
        (
            sum(w * c[0] for w, c in zip(r["w"], corners, strict=True)),
            sum(w * c[1] for w, c in zip(r["w"], corners, strict=True)),
        )
        for r in rows
    ]
    tri = mtri.Triangulation([p[0] for p in xy], [p[1] for p in xy])
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    shade = ax.tripcolor(tri, [r["test"] for r in rows], shading="gouraud", cmap="viridis")
    ax.tricontour(
        tri, [r["test"] for r in rows], levels=[best_expert], colors="white", linewidths=1.2
    )
    ax.plot([p[0] for p in xy], [p[1] for p in xy], ".", color="black", markersize=2)
    for (x, y), name in zip(corners, skills, strict=True):
        ax.annotate(
            f"expert-{name}",
            (x, y),
            ha="center",
            va="bottom" if y else "top",
            xytext=(0, 6 if y else -6),
            textcoords="offset points",
        )
    fig.colorbar(shade, ax=ax, label="test mean over the three skills, %")
    ax.set_title(
        f"θ_base + Σ w_k τ_k, w on the simplex; white: the best expert ({best_expert:.1f})",
        fontsize=9,
    )
    ax.set_axis_off()
    ax.set_aspect("equal")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", type=Path, default=ROOT / ".testbed" / "small")
    parser.add_argument("--step", type=float, default=0.1, help="grid step on each weight")
    parser.add_argument("--plot", type=Path, help="write the ternary heatmap here")
    parser.add_argument("--json", type=Path, help="write every mixture's scores here")
    args = parser.parse_args()
    torch.manual_seed(0)
    floor = _floor()
    print(f"floor: 3,000 float32 384x384 GEMMs on one thread in {floor:.2f} s")

    testbed = load_testbed(args.testbed)
    skills = list(testbed.skills)
    paths = testbed.models()
    experts = [expert_name(s) for s in skills]
    model = AutoModelForCausalLM.from_pretrained(paths["base"]).eval()
    sources = {
        name: AutoModelForCausalLM.from_pretrained(paths[name]).state_dict()
        for name in ["base", *experts]
    }
    tasks = {
        split: [testbed.task(s, split, limit=limit) for s in skills]
        for split, limit in SPLITS.items()
    }

    t0 = time.perf_counter()
    rows = []
    grid = simplex(len(skills), round(1 / args.step))
    for n, w in enumerate(grid, 1):
        recipe = {  # CycleQD's crossover recipe with the mixture's weights
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "models": [
                {"model": e, "parameters": {"weight": x}} for e, x in zip(experts, w, strict=True)
            ],
            "parameters": {"lambda": 1.0, "normalize": False},
        }
        merge_into_module(model, recipe, sources)
        row: dict = {"w": list(w)}
        with torch.inference_mode():
            for split, split_tasks in tasks.items():
                row[f"{split}_per_skill"] = [
                    100 * float(t.score(model).mean()) for t in split_tasks
                ]
                row[split] = sum(row[f"{split}_per_skill"]) / len(skills)
        rows.append(row)
        print(f"\r{n}/{len(grid)} mixtures scored", end="", flush=True)
    wall = time.perf_counter() - t0
    print(f"\n{len(grid)} mixtures in {wall:.0f} s ({wall / floor:.0f} floors)\n")

    def line(label: str, r: dict) -> str:
        w = ", ".join(f"{x:.1f}" for x in r["w"])
        return f"| {label} | {w} | {r['train']:.1f} | {r['validation']:.1f} | {r['test']:.1f} |"

    print(
        f"| mixture | w ({', '.join(skills)}) | train mean (fitness) "
        "| validation mean | test mean |"
    )
    print("|---|---|---:|---:|---:|")
    corners = [r for r in rows if max(r["w"]) == 1.0]
    for r in corners:
        print(line(f"expert-{skills[r['w'].index(1.0)]}", r))
    for split, label in [
        ("train", "picked on train"),
        ("validation", "picked on validation"),
        ("test", "best on test (oracle)"),
    ]:
        print(line(label, max(rows, key=lambda r: r[split])))
    best_expert = max(r["test"] for r in corners)
    ahead = sum(r["test"] > best_expert for r in rows)
    print(f"\n{ahead} of {len(rows)} mixtures beat the best expert's test mean ({best_expert:.1f})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"skills": skills, "floor_s": floor, "rows": rows}))
    if args.plot and len(skills) == 3:
        _plot(rows, skills, best_expert, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
