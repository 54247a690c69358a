"""M2N2 on sklearn's digits: speed of one from-scratch run, and the published fidelity sweeps.

    python bench/m2n2_digits.py                        # speed: one 50,000-evaluation run
    python bench/m2n2_digits.py --evaluations 5000     # a shorter speed run
    python bench/m2n2_digits.py --sweep scratch --seeds 5
    python bench/m2n2_digits.py --sweep experts --seeds 5

Speed prints evaluations per second and the ratio to the published reference
(≈ 15 minutes for 50,000 evaluations on 2 cores, ≈ 55 evaluations/s). The sweeps
print a table of test accuracy (mean ± std over seeds) of the archive member with
the best training accuracy, as published (METHODS.md §3), and write it as JSON to
``.bench/m2n2/<sweep>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from shoal.search.m2n2 import M2N2
from shoal.search.m2n2_flat import FlatM2N2, FlatModel
from shoal.tasks.classification import image_tasks
from shoal.testbed.images import digits_mlp, load_digits_data, train_experts

REFERENCE_SECONDS = 15 * 60  # published: one 50,000-evaluation run on 2 cores
REFERENCE_EVALS = 50_000

# the published ablations from two experts (METHODS.md §3); GA = no competition, no matchmaker
EXPERT_VARIANTS: dict[str, dict[str, Any]] = {
    "M2N2": {},
    "no attraction": {"matchmaker": "fitness"},
    "no split point": {"splitpoint": False},
    "GA": {"alpha": 0.0, "matchmaker": "fitness"},
}
PUBLISHED = {"M2N2": 0.685, "no attraction": 0.66, "no split point": 0.577, "GA": 0.52}


def run_once(options: dict[str, Any], evaluations: int, experts: bool) -> dict[str, float]:
    """One run; returns test/train accuracy of the best-training member, seconds, evals/s."""
    data = load_digits_data()
    tasks = image_tasks(data)
    model = FlatModel(digits_mlp())
    sources = {}
    if experts:
        sources = {k: model.flatten(m) for k, m in train_experts(data).items()}
    algo = M2N2(options, seeds=list(sources))
    runner = FlatM2N2(algo, model, {"digits-train": tasks["train"]}, sources=sources)
    t0 = time.perf_counter()
    runner.run(evaluations)
    seconds = time.perf_counter() - t0
    model.load(runner.best_vector())
    best = algo.best
    assert best is not None
    return {
        "test_accuracy": tasks["test"].accuracy(model.module),
        "train_accuracy": best.fitness,
        "seconds": seconds,
        "evals_per_s": evaluations / seconds,
    }


def speed(evaluations: int, batch_size: int, seed: int) -> None:
    """Time one from-scratch run and compare with the published 15 minutes."""
    opts = {"init": "scratch", "seed": seed, "batch_size": batch_size}
    r = run_once(opts, evaluations, experts=False)
    projected = REFERENCE_EVALS / r["evals_per_s"]
    print(f"threads={torch.get_num_threads()} batch_size={batch_size} evaluations={evaluations}")
    print(f"evals/s            {r['evals_per_s']:.0f}")
    print(f"wall seconds       {r['seconds']:.1f}")
    print(f"50k projected      {projected:.1f} s  (goal ≤ 60 s)")
    print(f"speed-up vs 15 min {REFERENCE_SECONDS / projected:.1f}×")
    print(f"test accuracy      {r['test_accuracy']:.3f} (train {r['train_accuracy']:.3f})")


def pick_threads() -> int:
    """1 or 2 intra-op threads, whichever runs a short from-scratch run faster here."""
    best, best_rate = 1, 0.0
    for n in (1, 2):
        torch.set_num_threads(n)
        rate = run_once({"init": "scratch", "seed": 0}, 2000, experts=False)["evals_per_s"]
        print(f"calibration: {n} thread(s) {rate:.0f} evals/s")
        if rate > best_rate:
            best, best_rate = n, rate
    return best


def sweep(kind: str, seeds: int, evaluations: int | None, out: Path, first_seed: int = 0) -> None:
    """Run the published comparison over ``seeds`` seeds and print mean ± std."""
    variants = {"M2N2": {"init": "scratch"}} if kind == "scratch" else EXPERT_VARIANTS
    n_eval = evaluations or (50_000 if kind == "scratch" else 10_000)
    results: dict[str, list[dict[str, float]]] = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, opts in variants.items():
        for s in range(first_seed, first_seed + seeds):
            r = run_once({**opts, "seed": s}, n_eval, experts=kind == "experts")
            results.setdefault(name, []).append(r)
            print(f"{kind} {name} seed {s}: test {r['test_accuracy']:.4f} ({r['seconds']:.0f} s)")
            out.write_text(json.dumps({"evaluations": n_eval, "results": results}, indent=1))
    print(f"\n{kind}, {n_eval} evaluations, {seeds} seeds: test accuracy of best-train member")
    for name, rows in results.items():
        acc = [r["test_accuracy"] for r in rows]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        pub = PUBLISHED.get(name, 0.87) if kind == "experts" else 0.87
        print(f"  {name:16s} {statistics.mean(acc):.3f} ± {sd:.3f}   (published ≈ {pub:.3f})")


def main() -> None:
    """Command line of the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--evaluations", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=1, help="k > 1: the batched variant")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        default="auto",
        help="torch threads, or auto: time 2,000 evaluations with 1 and 2, keep the faster",
    )
    ap.add_argument("--first-seed", type=int, default=0, help="sweeps: seeds first..first+n-1")
    ap.add_argument("--sweep", choices=["scratch", "experts"], default=None)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads == "auto":
        torch.set_num_threads(pick_threads())
    else:
        torch.set_num_threads(int(args.threads))
    if args.sweep:
        name = args.sweep if args.first_seed == 0 else f"{args.sweep}-from{args.first_seed}"
        out = args.out or Path(".bench/m2n2") / f"{name}.json"
        sweep(args.sweep, args.seeds, args.evaluations, out, args.first_seed)
    else:
        speed(args.evaluations or REFERENCE_EVALS, args.batch_size, args.seed)


if __name__ == "__main__":
    main()
