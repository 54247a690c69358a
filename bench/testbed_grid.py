"""PS, per-layer PS and PS+DFS over several testbed builds and CMA-ES seeds, in one table.

    shoal testbed build .testbed/small-s0 --size small --seed 0      # and s1, s2
    python bench/testbed_grid.py --builds .testbed/small-s0 .testbed/small-s1 \\
        .testbed/small-s2 --seeds 0 1 2 --runs .bench/grid

Each (variant, build, seed) is one ``shoal evolve`` of the example config
(``examples/ps-testbed-small.yaml``, with ``algorithm.groups=per_layer`` for the
per-layer variant, ``examples/ps-dfs-testbed-small.yaml`` for PS+DFS) pointed at the build,
written to ``RUNS/<variant>-b<build>-p<seed>``; finished runs are read, not run again, so
the grid can be filled over several sittings (``--no-run`` only prints). Every run scores
the base, the experts and the untuned DARE-TIES merge itself (``baselines``), on the same
build, so each row compares like with like.

Printed per build: each expert's and the untuned merge's test mean; per variant the test
mean ± sd over the seeds and the run **chosen on validation** (the seed with the best
validation mean — what a user without the test split would ship), with its test mean.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from _evolve_example import evolve_example

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "ps": ("ps-testbed-small.yaml", []),
    "pl": ("ps-testbed-small.yaml", ["--set", "algorithm.groups=per_layer"]),
    "psdfs": ("ps-dfs-testbed-small.yaml", []),
}
LABELS = {"ps": "PS", "pl": "PS per_layer", "psdfs": "PS+DFS"}


def _run(variant: str, build: Path, seed: int, run_dir: Path) -> None:
    example, extra = VARIANTS[variant]
    evolve_example(ROOT / "examples" / example, build, run_dir, ["--set", f"seed={seed}", *extra])


def _mean(scores: dict[str, Any], split: str) -> float:
    return float((scores.get(split) or {}).get("mean", float("nan")))


def _validation(run_dir: Path, summary: dict[str, Any]) -> float:
    """The best's validation mean: from the summary, or (runs made before
    ``tasks.validation`` existed) from a ``validation.json`` beside it."""
    value = _mean(summary["best"]["scores"], "validation")
    side = run_dir / "validation.json"
    if value != value and side.is_file():  # NaN: not in the summary
        value = float(json.loads(side.read_text())["mean"])
    return value


def _pm(values: list[float]) -> str:
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builds", nargs="+", type=Path, required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--runs", type=Path, default=ROOT / ".bench" / "grid")
    parser.add_argument("--no-run", action="store_true", help="only read finished runs")
    args = parser.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)

    rows = []
    for b, build in enumerate(args.builds):
        if not (build / "testbed.json").is_file():
            print(
                f"{build}: not built yet (shoal testbed build {build} --size small --seed {b})",
                file=sys.stderr,
            )
            continue
        tb = json.loads((build / "testbed.json").read_text())
        base: dict[str, tuple[float, float]] = {}  # name -> (validation, test)
        cells: dict[str, list[tuple[float, float]]] = {}
        for variant in args.variants:
            for seed in args.seeds:
                run_dir = args.runs / f"{variant}-b{b}-p{seed}"
                if not (run_dir / "summary.json").is_file() and not args.no_run:
                    _run(variant, build, seed, run_dir)
                if not (run_dir / "summary.json").is_file():
                    continue
                summary = json.loads((run_dir / "summary.json").read_text())
                for name, scores in (summary.get("baselines") or {}).items():
                    if name != "ps":  # PS+DFS's first stage, not a baseline
                        val = _mean(scores, "validation")
                        if name not in base or base[name][0] != base[name][0]:  # NaN: older run
                            base[name] = (val, _mean(scores, "test"))
                test = _mean(summary["best"]["scores"], "test")
                cells.setdefault(variant, []).append((_validation(run_dir, summary), test))
        fingerprint = tb.get("fingerprint", {}).get("weights", "?")
        rows.append((build, fingerprint, base, cells))

    for build, fingerprint, base, cells in rows:
        print(f"\n## {build} (fingerprint {fingerprint})")
        print("| model | validation mean (%) | test mean (%) |")
        print("|---|---:|---:|")
        for name, (val, test) in base.items():
            print(f"| {name} | {100 * val:.1f} | {100 * test:.1f} |")
        for variant, runs in cells.items():
            chosen = max(runs, key=lambda r: r[0])  # the best validation mean
            vals, tests = _pm([v for v, _ in runs]), _pm([t for _, t in runs])
            print(f"| {LABELS[variant]}, {len(runs)} seeds | {vals} | {tests} |")
            print(
                f"| {LABELS[variant]}, seed chosen on validation | {100 * chosen[0]:.1f} "
                f"| {100 * chosen[1]:.1f} |"
            )


if __name__ == "__main__":
    main()
