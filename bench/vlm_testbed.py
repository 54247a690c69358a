"""The VLM acceptance run: build the VLM testbed, evolve the language part, score on test.

Builds ``shoal testbed build --kind vlm`` (``small``) unless it exists, runs PS of
``examples/vlm-ps-testbed-small.yaml`` (``--algorithm dfs``: DFS of
``examples/vlm-dfs-testbed-small.yaml``; ``--algorithm ps-dfs``: the two as stages, DFS
over the PS result's and the expert's layers; paths made absolute) and prints, on the held-out
test items, the image skill (``digits``) and the text skill (``increment``) of the VLM,
the LM expert (scored on the questions alone: it cannot see images), the untuned task
arithmetic merge (weights 1, 1) and the evolved model; then checks that every vision tower
and projector tensor of the evolved model equals the VLM's bit for bit. Also times one
plain forward pass of the VLM as the floor the build time is read against.

    OMP_NUM_THREADS=1 python bench/vlm_testbed.py [--testbed .testbed/vlm-small] [--budget 80]
        [--algorithm ps|dfs|ps-dfs]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {
    "ps": ROOT / "examples" / "vlm-ps-testbed-small.yaml",
    "dfs": ROOT / "examples" / "vlm-dfs-testbed-small.yaml",
}


def _config(testbed: Path, budget: int, algorithm: str = "ps") -> dict[str, Any]:
    from shoal._yaml import safe_load

    if algorithm == "ps-dfs":  # PS, then DFS over the PS result's layers and the expert's
        cfg = _config(testbed, budget, "ps")
        dfs = dict(safe_load(EXAMPLES["dfs"].read_text())["algorithm"], models=["ps", "expert"])
        cfg["stages"] = [
            {"name": "ps", "algorithm": cfg.pop("algorithm")},
            {"name": "dfs", "algorithm": dfs},
        ]
        return cfg
    cfg = safe_load(EXAMPLES[algorithm].read_text())
    cfg["models"] = {name: str(testbed / name) for name in cfg["models"]}
    cfg["baselines"] = False  # the sources are scored below, on the test split
    for specs in cfg["tasks"].values():
        for spec in specs:
            spec["path"] = str(testbed / "data" / Path(spec["path"]).name)
            spec["images"] = str(testbed / "data" / "images.npy")
    cfg["budget"] = {"evaluations": budget}
    return cfg


def _forward_seconds(vlm_dir: Path) -> float:
    """Seconds of one forward pass of the VLM on a batch of 32 image questions."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(vlm_dir).eval()
    n = int(model.config.image_seq_length)
    ids = torch.full((32, n + 12), 5, dtype=torch.long)
    ids[:, :n] = int(model.config.image_token_index)
    pixels = torch.zeros(32, 1, 8, 8)
    with torch.inference_mode():
        model(input_ids=ids, pixel_values=pixels)  # warm-up
        start = time.perf_counter()
        model(input_ids=ids, pixel_values=pixels)
    return time.perf_counter() - start


def _vision_bit_equal(best: Path, vlm: Path) -> tuple[int, bool]:
    from transformers import AutoModelForImageTextToText

    a = AutoModelForImageTextToText.from_pretrained(best).state_dict()
    b = AutoModelForImageTextToText.from_pretrained(vlm).state_dict()
    names = [n for n in b if n.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
    return len(names), all(torch.equal(a[n], b[n]) for n in names)


def main() -> None:
    """Run the acceptance measurement and print its table."""
    from shoal.merge import merge_to_disk
    from shoal.search.runner import evolve
    from shoal.testbed.vlm import build_vlm_testbed, score_vlm_testbed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", type=Path, default=ROOT / ".testbed" / "vlm-small")
    parser.add_argument("--budget", type=int, default=80)
    parser.add_argument(
        "--algorithm",
        choices=[*sorted(EXAMPLES), "ps-dfs"],
        default="ps",
        help="ps-dfs: PS, then DFS over its result and the expert (--budget each)",
    )
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    testbed: Path = args.testbed.resolve()
    figures: dict[str, Any] = {}
    if not (testbed / "vlm_testbed.json").is_file():
        build_vlm_testbed(testbed, "small", 0)
    meta = json.loads((testbed / "vlm_testbed.json").read_text())
    figures["build_seconds"] = meta["build_seconds"]
    figures["forward_seconds"] = _forward_seconds(testbed / "vlm")

    work = Path(tempfile.mkdtemp(prefix="vlm-bench-"))
    run_dir = args.run_dir or work / "run"
    start = time.perf_counter()
    evolve(_config(testbed, args.budget, args.algorithm), run_dir, progress=True)
    figures["evolve_seconds"] = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    evolved = {k: v for k, v in summary["best"]["scores"]["test"].items()}
    figures["best_recipe"] = summary["best"]["recipe"]

    untuned = merge_to_disk(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(testbed / "base"),
            "models": [
                {"model": str(testbed / "vlm"), "parameters": {"weight": 1.0}},
                {"model": str(testbed / "expert"), "parameters": {"weight": 1.0}},
            ],
        },
        work / "untuned",
        progress=False,
    )
    paths = {"vlm": testbed / "vlm", "expert": testbed / "expert", "untuned": untuned}
    rows = score_vlm_testbed(testbed, {k: str(v) for k, v in paths.items()}, split="test")
    skills = ("digits", "increment")
    rows[f"evolved ({args.algorithm})"] = {skill: evolved[f"{skill}-test"] for skill in skills}
    figures["test"] = rows
    count, equal = _vision_bit_equal(run_dir / "best", testbed / "vlm")
    figures["vision_tensors"], figures["vision_bit_equal"] = count, equal

    print(
        f"test exact match (%), {meta['n']['digits']['test']} image / "
        f"{meta['n']['increment']['test']} text items"
    )
    print(f"{'model':<16}{'digits':>8}{'increment':>11}{'mean':>8}")
    for name, s in rows.items():
        mean = (s["digits"] + s["increment"]) / 2
        print(f"{name:<16}{100 * s['digits']:8.1f}{100 * s['increment']:11.1f}{100 * mean:8.1f}")
    print(
        f"build {meta['build_seconds']:.1f} s (one forward pass of 32: "
        f"{1000 * figures['forward_seconds']:.1f} ms); evolve {figures['evolve_seconds']:.1f} s"
    )
    print(f"vision tower + projector: {count} tensors, bit-equal to the VLM's: {equal}")
    if args.algorithm != "ps":
        params = figures["best_recipe"]["parameters"]
        scales = [round(x, 3) for x in params["scales"]]
        print(f"best layer path: {params['path']}, scales {scales}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
