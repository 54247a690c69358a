"""Overhead of the search loop as a fraction of evaluation time (target: <= 10 %).

Runs a short serial PS search (DARE-TIES merges built in place) on the LM testbed and
splits the loop's wall time into *scoring* (the tasks generating and checking answers)
and *overhead* (everything else: ask/tell, building the candidate in place from its
recipe, logging, atomic state writes). Prints the figures and the ratio.

    python bench/loop_overhead.py [--testbed DIR] [--evaluations N] [--limit K]

Without --testbed it uses .testbed/small if present, else builds the `tiny` testbed into
.bench/testbed-tiny (about a minute on 2 cores; reused afterwards).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _testbed(arg: str | None) -> Path:
    if arg:
        return Path(arg).resolve()
    small = ROOT / ".testbed" / "small"
    if (small / "testbed.json").is_file():
        return small
    tiny = ROOT / ".bench" / "testbed-tiny"
    if not (tiny / "testbed.json").is_file():
        from shoal.testbed import build_testbed

        print(f"building the tiny testbed into {tiny} ...", flush=True)
        build_testbed(tiny, size="tiny", seed=0)
    return tiny


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", default=None)
    parser.add_argument("--evaluations", type=int, default=24)
    parser.add_argument(
        "--limit", type=int, default=100, help="fitness examples per skill (as the PS example)"
    )
    parser.add_argument("--algorithm", default="ps")
    args = parser.parse_args()

    from shoal.search.run_folder import RunFolder
    from shoal.search.runner import evolve
    from shoal.testbed import load_testbed

    tb_dir = _testbed(args.testbed)
    tb = load_testbed(tb_dir)
    models = {name: str(path) for name, path in tb.models().items()}
    config = {
        "models": models,
        "base_model": "base",
        "loader": {"type": "hf-causal-lm", "model": "base"},
        "tasks": {
            "fitness": [
                {
                    "type": "testbed",
                    "dir": str(tb_dir),
                    "skill": s,
                    "split": "train",
                    "limit": args.limit,
                }
                for s in tb.skills
            ]
        },
        "algorithm": {"name": args.algorithm},
        "budget": {"evaluations": args.evaluations},
        "executor": {"type": "serial"},
        "progress": False,
        "seed": 0,
    }
    run_dir = Path(tempfile.mkdtemp(prefix="shoal-bench-")) / "run"
    try:
        t0 = time.perf_counter()
        result = evolve(config, run_dir)
        total = time.perf_counter() - t0
        events = RunFolder(run_dir).events.read()
        loop = result.wall_seconds
        score = sum(e["seconds"] - e["build_seconds"] for e in events)
        build = sum(e["build_seconds"] for e in events)
        overhead = loop - score
        print(f"testbed            {tb_dir}")
        print(
            f"evaluations        {len(events)} ({args.algorithm}, {args.limit} examples x "
            f"{len(tb.skills)} skills)"
        )
        print(f"loop wall          {loop:8.2f} s   (whole run incl. start-up/export {total:.2f} s)")
        print(
            f"scoring            {score:8.2f} s   ({score / len(events) * 1000:.0f} ms/candidate)"
        )
        print(
            f"build in place     {build:8.2f} s   ({build / len(events) * 1000:.1f} ms/candidate)"
        )
        print(f"other loop work    {overhead - build:8.2f} s")
        print(f"overhead / loop    {overhead / loop:8.1%}   (target <= 10 %)")
        print(f"overhead / scoring {overhead / score:8.1%}")
    finally:
        shutil.rmtree(run_dir.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
