"""The search loop's own cost, measured in one run per setting.

1. **A small model** — M2N2 on sklearn's digits (``examples/m2n2-digits-scratch.yaml``,
   a 19,210-parameter MLP scored in well under a millisecond): the loop's own work per
   candidate (ask/tell, event lines, checkpoints, the store's bookkeeping; everything but
   building and scoring), target ≤ 1 ms; building the child (a flat vector) is shown apart.
2. **A language model** — a short serial PS search (DARE-TIES merges built in place) on the
   LM testbed: everything that is not scoring, as a fraction of the loop (target ≤ 10 %).
   ``--algorithm cycleqd`` measures CycleQD instead (task-arithmetic crossover, SVD
   mutation, every child stored, three archives updated): the same fraction.

Both figures come from the run's own events (``seconds``, ``build_seconds`` per candidate)
against the loop's wall time, so they hold on a slow host as on a fast one.

    python bench/loop_overhead.py [--testbed DIR] [--evaluations N] [--limit K] [--skip-lm]
                                  [--algorithm ps|cycleqd]

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


def small_model(evaluations: int) -> None:
    """M2N2 on digits: the loop's own work per candidate, apart from building and scoring."""
    import yaml

    from shoal.search.run_folder import RunFolder
    from shoal.search.runner import evolve

    config = yaml.safe_load((ROOT / "examples" / "m2n2-digits-scratch.yaml").read_text())
    config["budget"] = {"evaluations": evaluations}
    config["progress"] = False
    run_dir = Path(tempfile.mkdtemp(prefix="shoal-bench-")) / "run"
    try:
        result = evolve(config, run_dir)
        events = RunFolder(run_dir).events.read()
        n, loop = len(events), result.wall_seconds
        work = sum(e["seconds"] for e in events)
        build = sum(e["build_seconds"] for e in events)
        own = loop - work
        print(f"small model        M2N2 on digits, {n} evaluations, serial")
        print(f"loop wall          {loop:8.2f} s   ({n / loop:.0f} evaluations/s)")
        print(f"scoring            {(work - build) / n * 1e3:8.3f} ms/candidate")
        print(f"build (flat)       {build / n * 1e3:8.3f} ms/candidate")
        print(f"loop's own work    {own / n * 1e3:8.3f} ms/candidate   (target <= 1 ms)")
        print()
    finally:
        shutil.rmtree(run_dir.parent, ignore_errors=True)


def _algorithm(name: str, skills: list[str], evaluations: int) -> dict:
    """The algorithm block: PS as the example, or CycleQD over the testbed's skill experts."""
    if name != "cycleqd":
        return {"name": name}
    generations = max(1, (evaluations - len(skills) - 1) // 2)
    return {
        "name": "cycleqd",
        "experts": {s: f"expert-{s}" for s in skills},
        "generations": generations,
        "children": 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", default=None)
    parser.add_argument("--evaluations", type=int, default=24)
    parser.add_argument(
        "--limit", type=int, default=100, help="fitness examples per skill (as the PS example)"
    )
    parser.add_argument("--algorithm", default="ps")
    parser.add_argument("--small-evaluations", type=int, default=5000)
    parser.add_argument("--skip-lm", action="store_true", help="only the small model")
    args = parser.parse_args()
    small_model(args.small_evaluations)
    if args.skip_lm:
        return

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
                    "name": s,
                }
                for s in tb.skills
            ]
        },
        "algorithm": _algorithm(args.algorithm, tb.skills, args.evaluations),
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
