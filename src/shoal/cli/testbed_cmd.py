"""``shoal testbed build|report``: the testbeds from the command line — language skills
(``shoal.testbed``), vision-language (``shoal.testbed.vlm``) and diffusion
(``shoal.testbed.diffusion``), one ``--kind`` each."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the ``testbed`` sub-app to ``app``."""
    sub = typer.Typer(
        name="testbed",
        help="Build and score a base model and its experts: language skills (reasoning-gym "
        "tasks), a vision-language model, or diffusion U-Nets.",
        no_args_is_help=True,
    )

    @sub.command("build")
    def build(
        out_dir: Path = typer.Argument(..., help="Directory to create."),
        kind: str = typer.Option(
            "lm",
            "--kind",
            help="lm: a Llama base and one expert per reasoning-gym skill; vlm: a tiny LLaVA "
            "on digit images and an LM expert (docs/vlm.md); diffusion: digits U-Nets, a "
            "base and two class-group experts, and their classifier (docs/diffusion.md).",
        ),
        size: str = typer.Option(
            None,
            "--size",
            help="lm: tiny (default, seconds) or small (minutes); "
            "vlm: tiny (seconds) or small (default, a minute); diffusion: one size.",
        ),
        seed: int = typer.Option(0, "--seed", help="Root seed: same seed, same tensors."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists."),
        threads: int = typer.Option(
            1, "--threads", help="lm: torch threads while training (part of the build: keep 1)."
        ),
        device: str | None = typer.Option(
            None, "--device", help="lm: train on cpu (default), cuda, ...; same data, same order."
        ),
        report: bool = typer.Option(
            None,
            "--report/--no-report",
            help="Score every model after building (lm: off by default; diffusion: on, "
            "per class on held-out seeds; vlm: always, its build scores them).",
        ),
    ) -> None:
        """Build a testbed: data splits, base model and experts, all from fixed seeds."""
        from shoal.errors import RecipeError

        if kind not in ("lm", "vlm", "diffusion"):
            raise RecipeError(f"--kind: unknown testbed {kind!r} (lm, vlm, diffusion)")
        if kind != "lm" and (threads != 1 or device is not None):
            raise RecipeError("--threads and --device: only for --kind lm")
        if kind == "vlm":
            if report is False:
                raise RecipeError("--no-report: the vlm testbed's build scores its models")
            _build_vlm(out_dir, size or "small", seed, overwrite)
            return
        if kind == "diffusion":
            from shoal.testbed.diffusion_report import build_and_report

            if size is not None:
                raise RecipeError("--size: the diffusion testbed has one size")
            score = True if report is None else report
            build_and_report(out_dir, seed=seed, overwrite=overwrite, score=score)
            return
        size = size or "tiny"
        from rich.console import Console
        from transformers.utils import logging as hf_logging

        from shoal._progress import phase_bars
        from shoal.testbed import build_testbed
        from shoal.testbed.build import prepare_target
        from shoal.testbed.sizes import get_size

        # an unknown size or an existing output fails before any progress bar is drawn
        preset = get_size(size)
        prepare_target(out_dir, overwrite)
        hf_logging.disable_progress_bar()
        console = Console(stderr=True)
        with phase_bars() as on_progress:
            path = build_testbed(
                out_dir,
                preset,
                seed,
                overwrite=overwrite,
                threads=threads,
                progress=on_progress,
                device=device,
            )
        console.print(f"testbed written to {path}")
        print(fingerprint_line(path))
        if report:  # None (not asked) is off for lm
            _report(path, "test", device)

    @sub.command("report")
    def report_cmd(
        testbed_dir: Path = typer.Argument(..., help="A directory made by `shoal testbed build`."),
        split: str = typer.Option("test", "--split", help="train, validation or test."),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda, ... (default cpu)."),
    ) -> None:
        """Score every model on every skill; print a table, write report.json/.md."""
        _report(testbed_dir, split, device)

    app.add_typer(sub)


def _build_vlm(out_dir: Path, size: str, seed: int, overwrite: bool) -> None:
    """``shoal testbed build --kind vlm``: build, then print each model's test exact match."""
    import json

    from rich.console import Console
    from rich.table import Table

    from shoal._progress import phase_bars
    from shoal.errors import OutputExistsError
    from shoal.testbed.vlm import build_vlm_testbed, get_vlm_size

    get_vlm_size(size)  # an unknown size or an existing output fails before a bar is drawn
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    with phase_bars() as on_progress:
        path = build_vlm_testbed(out_dir, size, seed, overwrite=overwrite, progress=on_progress)
    meta = json.loads((path / "vlm_testbed.json").read_text())
    table = Table(title=f"exact match (%), test split, {path}")
    table.add_column("model")
    for skill in meta["skills"]:
        table.add_column(f"{skill} (n={meta['n'][skill]['test']})", justify="right")
    for model, scores in meta["test_scores"].items():
        table.add_row(model, *(f"{100 * scores[s]:.1f}" for s in meta["skills"]))
    console = Console()
    console.print(table)
    console.print(f"testbed written to {path} in {meta['build_seconds']:.1f} s")


def fingerprint_line(path: Path) -> str:
    """One line: the weights' fingerprint, each expert's own-skill test score, the kernels."""
    import json

    meta = json.loads((path / "testbed.json").read_text())
    fp = meta.get("fingerprint", {})
    own = fp.get("own_skill_test") or {}
    scores = ", ".join(f"{skill} {value:.1f}" for skill, value in own.items())
    kernels = meta.get("kernels", {})
    line = (
        f"fingerprint {fp.get('weights', '?')}"
        + (f"   own-skill test exact match (%): {scores}" if scores else "")
        + f"   (seed {meta.get('seed')}, {meta.get('threads')} threads, "
        + f"kernels {kernels.get('aten_cpu_capability', '?')}"
        + f"/MKL_CBWR={kernels.get('mkl_cbwr')})"
    )
    if meta.get("device", "cpu") == "cpu" and kernels.get("aten_cpu_capability") != "AVX2":
        line += "\n  this host ran other kernels than AVX2: its weights differ from AVX2 builds'"
    return line


def _report(path: Path, split: str, device: str | None) -> None:
    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from shoal.testbed import report_testbed

    hf_logging.disable_progress_bar()
    console = Console()
    with console.status("scoring every model on every skill"):
        rep = report_testbed(path, split=split, device=device)
    table = Table(title=f"exact match (%), {split} split, {path}")
    table.add_column("model")
    for skill in rep.skills:
        table.add_column(f"{skill} (n={rep.n[skill]})", justify="right")
    for model in rep.models:
        cells = []
        for skill in rep.skills:
            text = f"{rep.scores[model][skill]:.1f}"
            cells.append(f"[bold]{text}[/bold]" if model == f"expert-{skill}" else text)
        table.add_row(model, *cells)
    console.print(table)
    margins = ", ".join(f"{s} {m:+.1f}" for s, m in rep.own_skill_margins().items())
    console.print(f"expert - base on own skill: {margins}   ({rep.seconds:.1f} s)")
