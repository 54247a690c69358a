"""shoal.report — plots and a Markdown summary drawn from a run folder.

:func:`write_report` reads ``events.jsonl`` (every stage of a multi-stage run, in order)
and ``summary.json`` and writes ``report/``: ``fitness.png`` (candidates and running best
against evaluations), ``tasks.png`` (per-task scores of the best so far; the final best on
fitness and test splits, with baselines), ``parameters.png`` (traces of the recipe
parameters that varied most) and ``summary.md``. A CycleQD run (or stage) adds
``archives[-STAGE].png`` (each archive as a quality heatmap over its behaviour axes, at four
points of the run) and ``qd[-STAGE].png`` (coverage, best quality and QD score against
evaluations), and its archives and specialists in the summary; with three experts as its
only seeds, also ``mixtures[-STAGE].png`` (every candidate as weights on the experts' task
vectors, the elites coloured by their training mean, the final aggregate marked).
``shoal report RUN_DIR`` redraws it.
"""

from __future__ import annotations

from pathlib import Path

from shoal._atomic import atomic_dir
from shoal.report.archives import archive_history, plot_archives, plot_qd_curves
from shoal.report.data import RunData, load_run, numeric_leaves
from shoal.report.mixtures import expert_mixtures, plot_mixtures
from shoal.report.plots import plot_fitness, plot_parameters, plot_tasks
from shoal.report.summary import summary_markdown

__all__ = ["RunData", "load_run", "numeric_leaves", "summary_markdown", "write_report"]


def write_report(run_dir: str | Path) -> Path:
    """(Re)draw ``RUN_DIR/report/`` from the run folder; returns its path.

    Raises:
        StateError: If ``run_dir`` holds no run, or one of its files does not parse.
    """
    data = load_run(run_dir)
    out = Path(run_dir) / "report"
    with atomic_dir(out) as tmp:
        tmp.mkdir(parents=True)
        if data.events:
            plot_fitness(data, tmp / "fitness.png")
            plot_tasks(data, tmp / "tasks.png")
            plot_parameters(data, tmp / "parameters.png")
        for stage, folder in data.folders():
            history = archive_history(folder)
            if history is not None:
                suffix = f"-{stage}" if stage else ""
                plot_archives(history, tmp / f"archives{suffix}.png", stage or "")
                plot_qd_curves(history, tmp / f"qd{suffix}.png", stage or "")
                mixtures = expert_mixtures(folder)
                if mixtures is not None and len(mixtures.experts) == 3:
                    plot_mixtures(mixtures, tmp / f"mixtures{suffix}.png", stage or "")
                data.archives[stage] = history
        (tmp / "summary.md").write_text(summary_markdown(data))
    return out
