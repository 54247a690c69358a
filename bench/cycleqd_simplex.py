"""How far CycleQD's merges can reach: every mixture of the experts on a simplex grid.

    python bench/cycleqd_simplex.py --testbed .testbed/small [--step 0.1] \\
        [--plot docs/img/cycleqd-simplex.png] [--json .bench/simplex.json] \\
        [--run .bench/cycleqd/cycleqd]

CycleQD's crossover θ_base + Σ ω_i τ_i / Σ ω_i (METHODS.md §4) keeps the weights of its
parents summing to one, and so does its final softmax aggregate: leaving out the SVD
mutation's steps (each at most ``w_max`` = 10 % of one expert's singular values, though
they add up along a lineage), every model the method makes is a *convex* mixture
θ_base + Σ_k w_k τ_k of the experts' task vectors, w on the simplex. This script builds
each mixture on a grid of the simplex (step 0.1: 66 models for three experts) with
shoal's own ``task_arithmetic`` merge, the recipe the crossover writes, and scores it on
the fitness items the search sees (the first 100 training items a skill), validation
and test (150 held-out items a skill).

Printed: the experts, then the mixture a search would pick on the training items, the
one a user would pick on validation, and the best on test — an oracle no method can
beat while choosing on other data — each with its three splits; and how many mixtures
beat the best expert on test; and how many of the items the search scores recur in the
train split. With ``--run`` (a CycleQD run on the same testbed, the experts its only
seeds) it places every candidate on the simplex (`shoal.report.mixtures`) and prints
where the final aggregate lies, and the elite nearest the mixture picked on validation
with its scores. The wall time is printed beside a floor measured in the
same process (3,000 float32 384 × 384 GEMMs on one thread). Runs on the build's pinned
kernels (one thread, AVX2), so the scores are the testbed's own.
"""

from __future__ import annotations

import os

from _evolve_example import PINNED_KERNELS, gemm_floor

os.environ.update(PINNED_KERNELS)  # before torch is imported: its kernels read them

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
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


def _plot(rows: list[dict], skills: list[str], best_expert: float, path: Path) -> None:
    """A ternary heatmap of the test mean over the simplex (three experts only): the
    contour of the best expert's score, the simplex's centre (where a near-uniform
    aggregate lands) and the mixture picked on validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.tri as mtri

    from shoal.report.mixtures import frame_triangle, triangle_xy

    xy = triangle_xy([r["w"] for r in rows])
    tri = mtri.Triangulation(xy[:, 0], xy[:, 1])
    test = [r["test"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    shade = ax.tripcolor(tri, test, shading="gouraud", cmap="viridis")
    ax.tricontour(tri, test, levels=[best_expert], colors="white", linewidths=1.2)
    ax.plot(xy[:, 0], xy[:, 1], ".", color="black", markersize=2)
    ax.plot(*triangle_xy([1 / 3] * 3), "x", color="red", markersize=9, label="⅓ each")
    picked = max(rows, key=lambda r: r["validation"])
    ax.plot(
        *triangle_xy(picked["w"]), "*", color="red", markersize=12, label="picked on validation"
    )
    frame_triangle(ax, [f"expert-{s}" for s in skills])
    fig.colorbar(shade, ax=ax, pad=0.08, label="test mean over the three skills, %")
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.set_title(
        f"θ_base + Σ w_k τ_k, w on the simplex\nwhite line: the best expert's {best_expert:.1f}",
        fontsize=9,
        pad=22,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def score_grid(
    model: Any, experts: list[str], sources: dict[str, Any], tasks: Any, steps: int
) -> list[dict[str, Any]]:
    """Build every mixture of the simplex grid into ``model`` and score it."""
    rows = []
    grid = simplex(len(experts), steps)
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
        rows.append({"w": list(w), **_score(model, tasks)})
        print(f"\r{n}/{len(grid)} mixtures scored", end="", flush=True)
    return rows


def _score(model: Any, tasks: dict[str, list[Any]]) -> dict[str, Any]:
    """Mean % per split (and per skill under ``<split>_per_skill``)."""
    row: dict[str, Any] = {}
    with torch.inference_mode():
        for split, split_tasks in tasks.items():
            row[f"{split}_per_skill"] = [100 * float(t.score(model).mean()) for t in split_tasks]
            row[split] = sum(row[f"{split}_per_skill"]) / len(split_tasks)
    return row


def _run_report(run_dir: Path, skills: list[str], rows: list[dict], model: Any, tasks: Any) -> None:
    """Where a CycleQD run's final aggregate and its elites lie on the simplex."""
    from safetensors.torch import load_file

    from shoal.report.mixtures import expert_mixtures
    from shoal.search.elites import open_qd_run

    qd = open_qd_run(run_dir)
    mixtures = expert_mixtures(qd.folder)
    if mixtures is None:
        raise SystemExit(f"{run_dir}: --run takes a CycleQD run seeded with the experts alone")
    order = [mixtures.tasks.index(s) for s in skills]  # the grid's order: the testbed's skills
    weights = {ref: [w[i] for i in order] for ref, w in mixtures.weights.items()}

    def distance(w: list[float], v: list[float]) -> float:
        return sum(abs(a - b) for a, b in zip(w, v, strict=True))

    def text(w: list[float]) -> str:
        return "(" + ", ".join(f"{x:.2f}" for x in w) + ")"

    print(f"\nrun {run_dir}:")
    if mixtures.aggregate is not None:  # the final aggregate, once scored
        agg = [mixtures.aggregate[i] for i in order]
        scores = json.loads(qd.folder.summary.read_text())["best"]["scores"]
        near = sorted(rows, key=lambda r: distance(r["w"], agg))[:2]
        print(
            f"  the final aggregate's weights on the experts {text(agg)}: "
            f"{100 * scores['validation']['mean']:.1f} validation, "
            f"{100 * scores['test']['mean']:.1f} test; the nearest grid mixtures "
            + ", ".join(f"{text(r['w'])} {r['validation']:.1f} / {r['test']:.1f}" for r in near)
        )
    else:
        print("  no final aggregate was scored (aggregate: none, or the budget ran out)")
    picked = max(rows, key=lambda r: r["validation"])
    elites = qd.elites()
    elite = min(elites, key=lambda e: distance(weights[e.ref], picked["w"]))
    if elite.ref.startswith("store:"):
        path = qd.folder.store / f"{elite.ref.removeprefix('store:')}.safetensors"
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
        if set(missing) - {"lm_head.weight"} or unexpected:  # only the tied head may be absent
            raise SystemExit(f"{path}: not this testbed's model ({(missing or unexpected)[0]})")
        got = _score(model, {k: v for k, v in tasks.items() if k != "train"})
    else:  # an expert kept its cell: its scores are the grid's corner
        got = next(r for r in rows if distance(r["w"], weights[elite.ref]) == 0)
    print(
        f"  of its {len(elites)} archive entries, the one nearest the mixture picked on "
        f"validation {text(picked['w'])}: {elite.task}:{elite.cell_text} "
        f"({elite.ref}) at {text(weights[elite.ref])}, "
        f"{got['validation']:.1f} validation, {got['test']:.1f} test"
    )


def _fitness_questions(testbed: Any, skills: list[str]) -> None:
    """Why "picked on train" and "picked on validation" differ: the train split keeps
    repeated questions (they are its distribution; testbed/skills.py), so the fitness items
    are mostly questions their skill's expert was fine-tuned on, while validation and test hold
    only questions that appear nowhere in train."""
    print("\nthe fitness items (the first 100 of train) against the whole train split:")
    for skill in skills:
        train = testbed.examples(skill, "train")
        counts = Counter(e["question"] for e in train)
        recur = sum(counts[e["question"]] > 1 for e in train[: SPLITS["train"]])
        print(
            f"  {skill}: {recur} of {SPLITS['train']} questions recur elsewhere in train; "
            f"train holds {len(counts):,} distinct questions in {len(train):,} items"
        )


def _aggregate_of_bests(rows: list[dict], skills: list[str]) -> None:
    """Where CycleQD's temperature-1 aggregate would land if every archive held the whole
    grid: each skill's best mixture on that skill, merged with β = softmax(quality)
    (qualities as fractions, as the runs score them). Choosing on train is what the
    search does; choosing on validation is what a fitness split held out of training
    would do — the question is whether such a split would move the aggregate."""
    from shoal.search.algorithms.cycleqd import aggregation_weights

    print("\nthe aggregate of each skill's best mixture (T = 1), its nearest grid mixture:")
    for split in ("train", "validation"):
        key = f"{split}_per_skill"
        bests = [max(rows, key=lambda r, k=k: r[key][k]) for k in range(len(skills))]
        quality = np.array([r[key][k] / 100 for k, r in enumerate(bests)])
        beta = aggregation_weights(quality)
        w = beta @ np.array([r["w"] for r in bests])
        near = min(rows, key=lambda r: float(np.abs(np.array(r["w"]) - w).sum()))
        print(
            f"  best per skill on {split}: "
            + ", ".join("(" + ", ".join(f"{x:.1f}" for x in r["w"]) + ")" for r in bests)
            + f" -> weights ({', '.join(f'{x:.2f}' for x in w)}), nearest grid mixture "
            f"{near['validation']:.1f} validation, {near['test']:.1f} test"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", type=Path, default=ROOT / ".testbed" / "small")
    parser.add_argument("--step", type=float, default=0.1, help="grid step on each weight")
    parser.add_argument("--plot", type=Path, help="write the ternary heatmap here")
    parser.add_argument("--json", type=Path, help="write every mixture's scores here")
    parser.add_argument("--grid", type=Path, help="read the grid's scores from an earlier --json")
    parser.add_argument(
        "--run", type=Path, help="a CycleQD run on this testbed: place its aggregate and elites"
    )
    args = parser.parse_args()
    steps = round(1 / args.step)
    if abs(steps * args.step - 1) > 1e-9:
        parser.error(f"--step {args.step}: 1/step must be a whole number (0.1, 0.05, 0.25, ...)")
    torch.manual_seed(0)
    floor = gemm_floor()
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

    if args.grid:
        rows = json.loads(args.grid.read_text())["rows"]
        print(f"the grid's scores: {args.grid}\n")
    else:
        t0 = time.perf_counter()
        rows = score_grid(model, experts, sources, tasks, steps)
        wall = time.perf_counter() - t0
        print(f"\n{len(rows)} mixtures in {wall:.0f} s ({wall / floor:.0f} floors)\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"skills": skills, "floor_s": floor, "rows": rows}))

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
    _fitness_questions(testbed, skills)
    _aggregate_of_bests(rows, skills)
    if args.run:
        _run_report(args.run, skills, rows, model, tasks)
    if args.plot and len(skills) == 3:
        _plot(rows, skills, best_expert, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
