"""``shoal export``: a CycleQD run's elites as a table, or one of them as a checkpoint; a run's
best U-Net as a diffusers pipeline."""

from __future__ import annotations

from pathlib import Path

import typer

__all__ = ["register"]

_HELP = """Write a run's model as a loadable checkpoint: a CycleQD elite or \
aggregation, or a best U-Net as a diffusers pipeline.

A CycleQD run: list its archives, or write one elite (or the aggregation) as a
checkpoint with a model card.

\b
    shoal export runs/cqd --list                     # every elite, a table
    shoal export runs/cqd --elite gcd:3,7 --out m    # the elite of one cell
    shoal export runs/cqd --elite gcd:best --out m   # the archive's best
    shoal export runs/cqd --aggregate --out m        # the weighted merge
    shoal export runs/unet --pipeline PIPE --out m   # best/ as PIPE's unet

TASK is an archive's quality task, CELL its indices on the behaviour axes (the
other tasks, in order) as --list prints them. The weights come from the run's
store, so the checkpoint is the model the run scored. In a multi-stage run the
CycleQD stage is found by itself, or name it with --stage. With --pipeline,
the run's best/ (a U-Net that shoal evolve merged) goes into a copy of the
diffusers pipeline PIPE as its --component (default unet); every other file is
PIPE's."""


def register(app: typer.Typer) -> None:
    """Add ``export`` to the ``shoal`` app."""

    @app.command("export", help=_HELP)
    def export_cmd(
        run_dir: Path = typer.Argument(..., help="A run folder written by shoal evolve."),
        elite: str = typer.Option(None, "--elite", help="TASK:CELL (CELL: i,j or best)."),
        aggregate: bool = typer.Option(False, "--aggregate", help="Export the aggregation."),
        list_: bool = typer.Option(False, "--list", help="Print every elite as a table."),
        out: Path = typer.Option(None, "--out", help="Folder to write the checkpoint to."),
        stage: str = typer.Option(None, "--stage", help="The CycleQD stage of a multi-stage run."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
        pipeline: Path = typer.Option(
            None, "--pipeline", help="A diffusers pipeline to put the run's best/ into."
        ),
        component: str = typer.Option("unet", "--component", help="With --pipeline: which."),
    ) -> None:
        from shoal.errors import OutputExistsError, RecipeError
        from shoal.search.elites import open_qd_run

        modes = [elite is not None, aggregate, list_, pipeline is not None]
        if sum(modes) != 1:
            raise RecipeError(
                "give exactly one of --list, --elite TASK:CELL, --aggregate, --pipeline PIPE"
            )
        if pipeline is not None:
            _install_best(run_dir, pipeline, component, out, overwrite)
            return
        qd = open_qd_run(run_dir, stage)
        if list_:
            _print_table(qd)
            return
        if out is None:
            raise RecipeError("--out: give the folder to write the checkpoint to")
        if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
            raise OutputExistsError(f"{out}: exists (--overwrite replaces it)")
        if elite is not None:
            row = qd.elite(elite)
            means = ", ".join(f"{t} {v:.4f}" for t, v in row.means.items())
            title = f"CycleQD elite {row.task}:{row.cell_text}"
            facts = [
                f"archive (quality task): **{row.task}**, cell {row.cell_text}",
                f"train means: {means}",
                f"evaluation {row.evaluation} of the run; model `{row.ref}`",
            ]
            recipe, evaluation = row.recipe, row.evaluation
        else:
            recipe = qd.aggregate_recipe()
            agg = qd.state.get("aggregate") or {}
            evaluation = agg.get("evaluation")
            title = "CycleQD aggregation of the elites"
            facts = [
                "θ_base + Σ_k β_k τ_k over the elites, β = softmax(quality / T) (METHODS.md §4)",
                f"{len(recipe['models'])} distinct models merged",
                f"train mean {agg['fitness']:.4f} (evaluation {evaluation})"
                if agg
                else "built from the archives as they stand (the run had not aggregated)",
            ]
        path = qd.export(recipe, out, evaluation=evaluation, title=title, facts=facts)
        typer.echo(f"exported: {path}")


def _install_best(
    run_dir: Path, pipeline: Path, component: str, out: Path | None, overwrite: bool
) -> None:
    from shoal.errors import RecipeError
    from shoal.merge.pipeline import install_component

    if out is None:
        raise RecipeError("--out: give the folder to write the pipeline to")
    best = run_dir / "best"
    if not best.is_dir():  # its weights are checked against the component's by the install
        raise RecipeError(f"{best}: no best model (is {run_dir} a finished shoal evolve run?)")
    path = install_component(pipeline, component, best, out, overwrite=overwrite)
    typer.echo(f"exported: {path} (pipeline {pipeline}, {component} from {best})")


def _print_table(qd: object) -> None:
    from rich.console import Console
    from rich.table import Table

    from shoal.search.elites import QDRun

    assert isinstance(qd, QDRun)
    rows = qd.elites()
    table = Table(title=f"{len(rows)} elites of {qd.folder.root}", show_lines=False)
    for col in ("archive", "cell", "quality", *qd.tasks, "evaluation", "model"):
        table.add_column(col, justify="right" if col not in ("archive", "model") else "left")
    for r in rows:
        table.add_row(
            r.task,
            r.cell_text,
            f"{r.quality:.4f}",
            *(f"{r.means[t]:.4f}" for t in qd.tasks),
            str(r.evaluation),
            r.ref if not r.ref.startswith("store:") else r.ref[:18] + "…",
        )
    Console(width=200).print(table)
