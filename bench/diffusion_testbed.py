"""The diffusion acceptance run: build the testbed, evolve PS and M2N2 merges, check them.

    python bench/diffusion_testbed.py [--testbed .testbed/diffusion] [--runs runs/bench-diffusion]

1. Builds ``.testbed/diffusion`` unless it exists (timed, beside a floor: 100 training
   steps of the same U-Net on one thread, measured just before).
2. Runs ``examples/diffusion-ps.yaml`` and ``examples/diffusion-m2n2.yaml`` (their budgets
   unless ``--evaluations``) with the base and the experts scored as baselines.
3. Puts each run's best U-Net into a copy of the base pipeline, loads it with
   ``DiffusionPipeline.from_pretrained``, checks that every file outside ``unet/`` is the
   base's byte for byte, and scores the loaded U-Net again on the held-out seeds.

Prints a table: classifier accuracy of the intended class over all ten classes, on the
fitness seeds (0–9 a class) and the held-out test seeds (1000–1049 a class).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def floor_seconds(steps: int = 100) -> float:
    """Seconds for ``steps`` Adam steps of the testbed U-Net at batch 128, one thread."""
    from shoal.testbed.diffusion import NULL_CLASS, testbed_unet

    torch.set_num_threads(1)
    unet = testbed_unet()
    opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1, 8, 8, generator=gen)
    y = torch.randint(0, NULL_CLASS, (128,), generator=gen)
    t = torch.randint(0, 1000, (128,), generator=gen)
    start = time.perf_counter()
    for _ in range(steps):
        loss = (unet(x, t, class_labels=y).sample - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def main() -> None:
    """Run the whole acceptance measurement and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", type=Path, default=ROOT / ".testbed" / "diffusion")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-diffusion")
    parser.add_argument("--evaluations", type=int, default=None)
    parser.add_argument("--algorithms", nargs="*", default=["ps", "m2n2"])
    args = parser.parse_args()

    from diffusers import DiffusionPipeline

    from shoal.merge.pipeline import install_component
    from shoal.search.runner import evolve
    from shoal.tasks.registry import TaskEnv, build_task
    from shoal.testbed.diffusion import build_diffusion_testbed

    if not args.testbed.exists():
        floor = floor_seconds()
        start = time.perf_counter()
        build_diffusion_testbed(args.testbed)
        built = time.perf_counter() - start
        after = floor_seconds()
        print(f"build {built:.0f} s; floor (100 training steps) {floor:.1f} s / {after:.1f} s")
    meta = json.loads((args.testbed / "testbed.json").read_text())
    print(
        f"testbed {args.testbed}: fingerprint {meta['fingerprint']}, built in "
        f"{meta['build_seconds']} s, classifier test accuracy "
        f"{meta['classifier_test_accuracy']:.3f}"
    )

    rows: dict[str, dict[str, float]] = {}
    for algo in args.algorithms:
        example = ROOT / "examples" / f"diffusion-{algo}.yaml"
        text = example.read_text().replace("../.testbed/diffusion", str(args.testbed.resolve()))
        config = yaml.safe_load(text)
        config["root"] = str(example.parent)
        overrides = ["progress=false"]
        if args.evaluations:
            overrides.append(f"budget.evaluations={args.evaluations}")
        run = args.runs / algo
        shutil.rmtree(run, ignore_errors=True)
        start = time.perf_counter()
        evolve(config, run, overrides=overrides)
        seconds = time.perf_counter() - start
        summary = json.loads((run / "summary.json").read_text())
        rows[f"{algo} best"] = {
            "fitness": summary["best"]["scores"]["fitness"]["mean"],
            "test": summary["best"]["scores"]["test"]["mean"],
        }
        for name, scores in (summary.get("baselines") or {}).items():
            means = {split: scores[split]["mean"] for split in ("fitness", "test")}
            rows.setdefault(name, means)
        print(f"{algo}: {summary['evaluations']} evaluations in {seconds:.0f} s")

        # the best U-Net back in the base pipeline: loads, untouched files bit-equal, same score
        out = args.runs / f"{algo}-pipeline"
        shutil.rmtree(out, ignore_errors=True)
        install_component(args.testbed / "base", "unet", run / "best", out)
        pipe = DiffusionPipeline.from_pretrained(str(out))
        base_files = _files(args.testbed / "base")
        out_files = _files(out)
        same = all(
            out_files.get(rel) == data
            for rel, data in base_files.items()
            if not rel.startswith("unet/")
        )
        test_spec = config["tasks"]["test"][0]
        task = build_task(test_spec, TaskEnv(root=str(example.parent)))
        again = float(task.score(pipe.unet).mean())
        print(
            f"{algo}: {type(pipe).__name__} loads from {out}; files outside unet/ bit-equal "
            f"to the base's: {same}; test accuracy of the loaded U-Net {again:.3f}"
        )

    print("\n| model | fitness (seeds 0–9 a class) | test (seeds 1000–1049 a class) |")
    print("|---|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {100 * r['fitness']:.1f} | {100 * r['test']:.1f} |")


if __name__ == "__main__":
    main()
