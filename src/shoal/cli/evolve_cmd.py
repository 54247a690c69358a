"""``shoal evolve`` and ``shoal report``.

Command bodies import the library inside, so registering them costs nothing at
``shoal --help`` time.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

__all__ = ["register", "run_and_report"]

# what a full, read-only or failing disk raises; any other OSError is a bug
_DISK_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EIO,
    errno.EFBIG,
}


@contextmanager
def _disk_errors(run_dir: str | Path, after: str | Callable[[], str]) -> Iterator[None]:
    """A write that the disk refuses ends in one line (path, errno; what next), exit 2.

    ``after`` says (or returns, once the error happened) what the user can do once the
    disk is fixed.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_ERRNOS:
            raise
        where = exc.filename if exc.filename is not None else run_dir
        code = errno.errorcode.get(exc.errno, str(exc.errno))
        reason = exc.strerror or os.strerror(exc.errno)
        hint = after if isinstance(after, str) else after()
        typer.echo(f"error: {where}: {reason} ({code}); {hint}", err=True)
        raise typer.Exit(2) from None


_EVOLVE_HELP = """Search for a model by evolution, as CONFIG says; write the run folder.

The config names the source models, the resident-model loader, the fitness and
test tasks, the algorithm (or `stages:`), a budget, the executor and a seed.

\b
    models: {base: tb/base, gcd: tb/expert-gcd, sum: tb/expert-chain_sum}
    base_model: base
    tasks:
      fitness: [{type: testbed, dir: tb, skill: gcd, split: train, limit: 32}]
      test:    [{type: testbed, dir: tb, skill: gcd, split: test}]
    algorithm: {name: ps}
    budget: {evaluations: 200}
    executor: {type: process, workers: 2}
    seed: 0

\b
    shoal evolve ps.yaml --run-dir runs/ps --set budget.evaluations=50
    shoal evolve ps.yaml --run-dir runs/ps --resume    # after Ctrl-C, a kill

Run folder: config.yaml, state.json, events.jsonl, store/, best/,
summary.json, report/. The run is saved every checkpoint_seconds (default
10; 0: every batch); after a kill, --resume replays the work since then and
ends as an unbroken run would. Ctrl-C stops after the batch in flight
(saved, resumable); twice aborts. Models, tasks and algorithm are checked
before anything is written; an error before the first batch is saved leaves
the run folder as it was, so fix CONFIG and rerun. One writer per run
folder: a second evolve or --resume on it is refused (it names the pid
holding RUN_DIR/.lock).
"""


def register(app: typer.Typer) -> None:
    """Add ``evolve`` and ``report`` to the ``shoal`` app."""

    @app.command("evolve", help=_EVOLVE_HELP)
    def evolve_cmd(
        config: Path = typer.Argument(None, help="Run config (YAML); not needed with --resume."),
        # a string, not a Path: typer would read an empty --run-dir as "." (this folder)
        run_dir: str = typer.Option(..., "--run-dir", help="Run folder to write."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --run-dir."),
        executor: str = typer.Option(
            None, "--executor", help="serial, process or ray (overrides executor.type)."
        ),
        overrides: list[str] = typer.Option(
            [], "--set", help="Override a config key: --set budget.evaluations=100 (YAML value)."
        ),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    ) -> None:
        from shoal.errors import RecipeError

        if executor is not None and executor not in ("serial", "process", "ray"):
            raise RecipeError(f"--executor: unknown executor {executor!r} (serial, process, ray)")
        if config is None and not resume:
            raise RecipeError("give a CONFIG file (or --resume an existing --run-dir)")
        run_and_report(
            config,
            run_dir,
            resume=resume,
            overrides=overrides,
            executor=executor,
            progress=False if no_progress else None,
        )

    @app.command("report")
    def report_cmd(
        run_dir: Path = typer.Argument(..., help="A run folder written by shoal evolve."),
    ) -> None:
        """(Re)draw the plots and summary.md of a run folder into RUN_DIR/report/.

        \b
        summary.md      status; the best's scores beside the baselines
        fitness.png     every candidate's fitness and the best so far
        tasks.png       the best so far on each fitness task
        parameters.png  how the recipe's numbers moved (PS, DFS)
        archives.png    CycleQD: quality over the behaviour axes, over time
        qd.png          CycleQD: coverage, best quality, QD score
        (archives-STAGE.png, qd-STAGE.png: a chain's CycleQD stage)

        A running or killed run can be drawn too: the report reads what is saved.
        """
        from shoal.report import write_report

        with _disk_errors(run_dir, f"free the disk, then: shoal report {run_dir}"):
            out = write_report(run_dir)
        typer.echo(f"report: {out / 'summary.md'}")


def run_and_report(
    config: Path | dict[str, Any] | None,
    run_dir: str,
    *,
    resume: bool = False,
    overrides: list[str] | None = None,
    executor: str | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run :func:`~shoal.search.runner.evolve`, draw the report, print where things are.

    Returns the run's summary. An interrupted run prints its ``--resume`` line and exits
    130; a full disk is one line, exit 2.
    """
    from shoal.report import write_report
    from shoal.search.run_folder import RunFolder
    from shoal.search.runner import evolve

    def next_step() -> str:
        if RunFolder(run_dir).has_state():
            return f"free the disk, then: shoal evolve --resume --run-dir {run_dir}"
        return "nothing of the run was saved; free the disk and rerun the command"

    with _disk_errors(run_dir, next_step):
        result = evolve(
            config,
            run_dir,
            resume=resume,
            overrides=overrides or (),
            executor=executor,
            progress=progress,
        )
    if result.status != "completed":
        typer.echo(
            f"stopped ({result.stop_reason}); continue with: shoal evolve --resume "
            f"--run-dir {run_dir}"
        )
        # SystemExit, not typer.Exit: the entry point reads a returned 130 as a
        # Ctrl-C that aborted a command, and would add "aborted" to this orderly stop
        sys.exit(130)
    with _disk_errors(run_dir, f"the run is complete; redraw with: shoal report {run_dir}"):
        report = write_report(run_dir)
    best = result.summary.get("best") or {}
    evaluations = result.summary.get("evaluations", result.evaluations)
    wall = float(result.summary.get("wall_seconds", result.wall_seconds))
    rate = f" ({evaluations / wall:.0f}/s)" if wall > 0 else ""
    typer.echo(f"{evaluations} evaluations, {wall:.1f} s{rate}; stopped: {result.stop_reason}")
    failed = int(result.summary.get("failed_candidates", 0))
    if failed:
        typer.echo(
            f"warning: {failed} candidates failed and counted as the worst (first: "
            f"{result.summary.get('first_failure')}); see events.jsonl",
            err=True,
        )
    for name, error in (result.summary.get("failed_at_the_end") or {}).items():
        typer.echo(f"warning: {name} could not be built or scored at the end: {error}", err=True)
    if best:
        scores = best.get("scores", {})
        parts = [f"{split} {vals.get('mean', float('nan')):.4f}" for split, vals in scores.items()]
        said = ", ".join(parts) if parts else "not scored: see the warnings"
        typer.echo(f"best: {best.get('path')} ({said})")
    typer.echo(f"report: {report / 'summary.md'}")
    return result.summary
