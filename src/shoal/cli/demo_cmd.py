"""``shoal demo``: M2N2 from scratch on sklearn's digits, in a minute or two on a laptop.

The command body imports torch and the library, so ``shoal --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["register"]

_HELP = """Evolve a digits classifier from random weights with M2N2 — no gradients.

An archive of 20 MLPs (64-256-10) starts from N(0, 0.01²); each step merges two
members with a split-point SLERP, adds a little noise and keeps the archive's
fittest under resource competition (METHODS.md §3). Runs on the CPU, writes a
run folder (best model, summary.json, plots) and prints where it is.

\b
    shoal demo
    shoal demo --evaluations 5000 --run-dir .demo/quick --seed 1
"""


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the ``shoal`` app."""

    @app.command("demo", help=_HELP)
    def demo_cmd(
        run_dir: Path = typer.Option(Path(".demo/run"), "--run-dir", help="Run folder to write."),
        evaluations: int = typer.Option(
            50_000, "--evaluations", min=100, help="Child evaluations (the published budget)."
        ),
        seed: int = typer.Option(0, "--seed", min=0, help="Root seed."),
        threads: int = typer.Option(2, "--threads", min=1, help="torch threads for the matmuls."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    ) -> None:
        import torch
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        from shoal.search.m2n2_digits import run_image_m2n2, write_run_folder

        torch.set_num_threads(threads)
        console = Console(stderr=True)
        progress = Progress(
            TextColumn("[bold]M2N2 digits"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("test acc {task.fields[test]}"),
            console=console,
            disable=no_progress,
        )
        with progress:
            bar = progress.add_task("m2n2", total=evaluations, test="-")

            def show(row: dict[str, float]) -> None:
                progress.update(
                    bar, completed=int(row["evaluations"]), test=f"{row['test_accuracy']:.3f}"
                )

            run = run_image_m2n2(
                evaluations=evaluations,
                options={"seed": seed},
                record_every=max(evaluations // 50, 100),
                on_record=show,
            )
        out = write_run_folder(run, run_dir)
        s = run.summary
        typer.echo(
            f"best member: test accuracy {s['best']['test_accuracy']:.3f} "
            f"(train {s['best']['train_accuracy']:.3f}) after {s['evaluations']} evaluations "
            f"in {s['wall_seconds']:.0f} s ({s['evals_per_second']:.0f}/s)"
        )
        typer.echo(f"run folder: {out}  (best/, summary.json, report/accuracy.png)")
