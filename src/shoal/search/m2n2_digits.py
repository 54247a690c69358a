"""M2N2's image experiment end to end: digits (or MNIST), from scratch or from two experts.

Used by ``shoal demo``, ``bench/m2n2_digits.py`` and the tests. The run goes through
the flat-vector fast path (:mod:`shoal.search.m2n2_flat`) and writes a run folder::

    config.yaml         the options as run
    state.json          algorithm state + round counter (resume with FlatM2N2.load)
    store.safetensors   the archive's weights
    best/               model.safetensors + config.json of the best-training member
    history.jsonl       curve points: evaluations, seconds, train/test accuracy,
                        training coverage, mean per-example entropy
    summary.json        final figures

The reported test accuracy is that of the archive member with the best training
accuracy (as published, METHODS.md §3).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from shoal._atomic import replace_dir, temp_sibling
from shoal.errors import OutputExistsError
from shoal.search.m2n2 import M2N2
from shoal.search.m2n2_flat import FlatM2N2, FlatModel, History
from shoal.tasks.classification import image_tasks
from shoal.testbed.images import build_mlp, load_image_data, train_experts

#: marker in summary.json that lets a later demo replace this folder
RUN_KIND = "m2n2-image"


@dataclass
class ImageRun:
    """A finished run: the runner, its curve and the final figures."""

    runner: FlatM2N2
    history: History
    summary: dict[str, Any]


def run_image_m2n2(
    *,
    evaluations: int,
    options: dict[str, Any] | None = None,
    data: str = "digits",
    hidden: int | None = None,
    experts: bool = False,
    record_every: int = 1000,
    on_record: Callable[[dict[str, float]], None] | None = None,
) -> ImageRun:
    """Run M2N2 on an image data set in memory.

    Args:
        evaluations: total child evaluations (initial members included).
        options: :class:`~shoal.search.m2n2.M2N2Options` fields; ``init`` defaults to
            ``seeds`` with ``experts`` and ``scratch`` otherwise.
        data: ``digits`` or ``mnist``.
        hidden: MLP width (default 256 for digits, 32 for MNIST).
        experts: start from the two experts (digits 0–4 and 5–9) instead of from scratch.
        record_every: evaluations between curve points.
        on_record: called with each new curve point (progress display).
    """
    ds = load_image_data(data)
    tasks = image_tasks(ds)
    width = hidden or (256 if data == "digits" else 32)
    opts = {"init": "seeds" if experts else "scratch", **(options or {})}
    model = FlatModel(build_mlp(ds.n_features, width, 10), opts.get("chromosomes"))
    sources: dict[str, torch.Tensor] = {}
    if opts["init"] == "seeds":
        trained = train_experts(ds, hidden=width)
        sources = {k: model.flatten(m) for k, m in trained.items()}
    algo = M2N2(opts, seeds=list(sources))
    runner = FlatM2N2(algo, model, {f"{ds.name}-train": tasks["train"]}, sources=sources)
    history = History()

    def record(r: FlatM2N2) -> None:
        row = history.record(r, tasks["test"])
        if on_record is not None:
            on_record(row)

    t0 = time.perf_counter()
    runner.run(evaluations, callback=record, every=record_every)
    seconds = time.perf_counter() - t0
    last = history.rows[-1]
    summary = {
        "kind": RUN_KIND,
        "data": ds.name,
        "evaluations": algo.evaluations,
        "wall_seconds": seconds,
        "evals_per_second": algo.evaluations / max(seconds, 1e-9),
        "best": {
            "train_accuracy": last["train_accuracy"],
            "test_accuracy": last["test_accuracy"],
            "evaluation": algo.best.evaluation if algo.best else None,
        },
        "archive": {"coverage": last["coverage"], "entropy": last["entropy"]},
        "options": algo.options.model_dump(),
        "mlp": {"in": ds.n_features, "hidden": width, "classes": 10},
    }
    return ImageRun(runner, history, summary)


def write_run_folder(run: ImageRun, run_dir: Path, *, overwrite_kind: str = RUN_KIND) -> Path:
    """Write the run folder atomically (temporary sibling, then rename).

    An existing ``run_dir`` is replaced only when its ``summary.json`` says it is a run
    of the same kind; anything else raises :class:`OutputExistsError`.
    """
    run_dir = Path(run_dir)
    if run_dir.exists():
        try:
            old = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("kind") != overwrite_kind:
            raise OutputExistsError(
                f"{run_dir} exists and is not an M2N2 image run; choose another --run-dir"
            )
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(run_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write_contents(run, tmp)
        replace_dir(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir


def _write_contents(run: ImageRun, out: Path) -> None:
    from safetensors.torch import save_file

    config = {"algorithm": {"name": "m2n2", **run.summary["options"]}, **run.summary["mlp"]}
    config["data"] = run.summary["data"]
    config["evaluations"] = run.summary["evaluations"]
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run.runner.save(out)
    best = out / "best"
    best.mkdir()
    model = run.runner.model
    model.load(run.runner.best_vector())
    tensors = {k: v.detach().contiguous() for k, v in model.module.state_dict().items()}
    save_file(tensors, str(best / "model.safetensors"))
    (best / "config.json").write_text(
        json.dumps({"architecture": "mlp", **run.summary["mlp"], "loader": "build_mlp"}, indent=1)
    )
    with (out / "history.jsonl").open("w") as fh:
        for row in run.history.rows:
            fh.write(json.dumps(row) + "\n")
    (out / "summary.json").write_text(json.dumps(run.summary, indent=1))
    plot_history(run.history.rows, out / "report")


def plot_history(rows: list[dict[str, float]], out_dir: Path) -> list[Path]:
    """Two PNGs: test (and train) accuracy vs evaluations; coverage and entropy vs evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    ev = [r["evaluations"] for r in rows]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ev, [r.get("test_accuracy", float("nan")) for r in rows], label="test")
    ax.plot(ev, [r["train_accuracy"] for r in rows], label="train", alpha=0.6)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("accuracy of the best-training member")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.plot(ev, [r["coverage"] for r in rows], color="tab:green", label="training coverage")
    ax1.set_xlabel("evaluations")
    ax1.set_ylabel("training coverage")
    ax2 = ax1.twinx()
    ax2.plot(ev, [r["entropy"] for r in rows], color="tab:purple", label="mean entropy")
    ax2.set_ylabel("mean per-example entropy (bits)")
    lines = ax1.get_lines() + ax2.get_lines()
    ax1.legend(lines, [str(line.get_label()) for line in lines], loc="lower right")
    fig.tight_layout()
    paths.append(out_dir / "diversity.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
