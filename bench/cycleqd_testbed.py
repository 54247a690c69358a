"""CycleQD on the `small` LM testbed and its three ablations, in one table.

    shoal testbed build .testbed/small --size small
    python bench/cycleqd_testbed.py --testbed .testbed/small --runs .bench/cycleqd \\
        [--generations 400] [--no-run]

Runs ``examples/cycleqd-testbed-small.yaml`` (serial, seed 0) pointed at the testbed, as
published and with each ablation of METHODS.md §4 — Gaussian mutation instead of the SVD
mutation, uniform instead of elite sampling, no cycling (one fixed quality task) — on the
same budget, each into ``RUNS/<variant>`` (a finished run is read, not run again).
``after-ps`` runs ``examples/ps-cycleqd-testbed-small.yaml``: per-layer PS, then CycleQD
with PS's result as a fourth seed (``--variants after-ps``; not in the default set). Every
run scores the base, the experts and the untuned DARE-TIES merge itself, so the rows of a
table compare like with like.

Printed: per variant the aggregated model's validation and test means, the coverage of
each archive, and the best elite of each archive on its own skill's test split beside
that skill's expert; the wall time of each run beside a floor measured in the same
process before the runs (3,000 float32 384 × 384 GEMMs on one thread), so the times
compare across hosts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _evolve_example import evolve_example, gemm_floor
from shoal.search.elites import open_qd_run

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cycleqd-testbed-small.yaml"
CHAIN = ROOT / "examples" / "ps-cycleqd-testbed-small.yaml"
#: variant -> (example, the CycleQD block's key path, extra arguments)
VARIANTS = {
    "cycleqd": (EXAMPLE, "algorithm", []),
    "gaussian-mutation": (EXAMPLE, "algorithm", ["--set", "algorithm.mutation=gaussian"]),
    "uniform-sampling": (EXAMPLE, "algorithm", ["--set", "algorithm.sampling=uniform"]),
    "no-cycling": (EXAMPLE, "algorithm", ["--set", "algorithm.cycling=false"]),
    "after-ps": (CHAIN, "stages.1.algorithm", []),
}
DEFAULT_VARIANTS = ["cycleqd", "gaussian-mutation", "uniform-sampling", "no-cycling"]


def _run(variant: str, testbed: Path, generations: int, run_dir: Path) -> None:
    example, key, extra = VARIANTS[variant]
    evolve_example(example, testbed, run_dir, ["--set", f"{key}.generations={generations}", *extra])


def _earlier_stages(run_dir: Path, cycleqd: str | None) -> list[dict[str, Any]]:
    """The summaries of a staged run's stages other than its CycleQD stage."""
    stages = json.loads((run_dir / "summary.json").read_text()).get("stages") or []
    return [s for s in stages if s.get("stage") != cycleqd]


def _mean(scores: dict[str, Any], split: str) -> float:
    return 100 * float((scores.get(split) or {}).get("mean", float("nan")))


def _own(scores: dict[str, Any], skill: str) -> float:
    """The test score on ``skill`` (test task names carry the skill: ``gcd/test``)."""
    test = scores.get("test") or {}
    return 100 * next((v for k, v in test.items() if k.split("/")[0] == skill), float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", type=Path, default=ROOT / ".testbed" / "small")
    parser.add_argument("--runs", type=Path, default=ROOT / ".bench" / "cycleqd")
    parser.add_argument("--generations", type=int, default=400)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--no-run", action="store_true", help="only read finished runs")
    args = parser.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    print(f"floor: 3,000 float32 384x384 GEMMs on one thread in {gemm_floor():.2f} s")

    rows = []
    for variant in args.variants:
        run_dir = args.runs / variant
        if not (run_dir / "summary.json").is_file() and not args.no_run:
            _run(variant, args.testbed, args.generations, run_dir)
        if not (run_dir / "summary.json").is_file():
            continue
        qd = open_qd_run(run_dir)  # the run itself, or its CycleQD stage
        summary = json.loads(qd.folder.summary.read_text())
        summary["baselines"] = json.loads((run_dir / "summary.json").read_text()).get("baselines")
        summary["earlier"] = _earlier_stages(run_dir, qd.stage)
        rows.append((variant, summary, qd.state))
    if not rows:
        return

    _, first, state = rows[0]
    tasks, experts = state["tasks"], state["options"]["experts"]
    base = first.get("baselines") or {}
    print("\n| model | evaluations | wall s | validation mean | test mean |")
    print("|---|---:|---:|---:|---:|")
    for name, scores in base.items():
        print(f"| {name} | | | {_mean(scores, 'validation'):.1f} | {_mean(scores, 'test'):.1f} |")
    for variant, summary, state in rows:
        for done in summary["earlier"]:  # a chain's stages before CycleQD (after-ps: PS)
            scores = done["best"]["scores"]
            print(
                f"| {variant}: its stage {done['stage']} | {done['evaluations']} "
                f"| {done['wall_seconds']:.0f} | {_mean(scores, 'validation'):.1f} "
                f"| {_mean(scores, 'test'):.1f} |"
            )
        scores = summary["best"]["scores"]
        final = "aggregate of the elites"
        if state["options"]["aggregate"] == "none":
            final = "elite with the best training mean"
        print(
            f"| {variant}: {final} | {summary['evaluations']} "
            f"| {summary['wall_seconds']:.0f} | {_mean(scores, 'validation'):.1f} "
            f"| {_mean(scores, 'test'):.1f} |"
        )

    print("\nbest elite of each archive on its own skill (test), against that skill's expert,")
    print("and the archives' coverage (of 225 cells):\n")
    head = " | ".join(f"{t}: elite / expert" for t in tasks)
    print(f"| variant | {head} | coverage |")
    print("|---|" + "---:|" * (len(tasks) + 1))
    for variant, summary, st in rows:
        cells = []
        for t in tasks:
            elite = (summary.get("specialists") or {}).get(f"best-{t}", {}).get("scores", {})
            expert = base.get(experts[t], {})
            cells.append(f"{_own(elite, t):.1f} / {_own(expert, t):.1f}")
        coverage = " / ".join(str(len(a["elites"])) for a in st["archives"])
        print(f"| {variant} | {' | '.join(cells)} | {coverage} |")


if __name__ == "__main__":
    main()
