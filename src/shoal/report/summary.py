"""``summary.md``: the run's key figures as Markdown."""

from __future__ import annotations

from typing import Any

from shoal.report.archives import ArchiveHistory
from shoal.report.data import RunData

__all__ = ["summary_markdown"]


_SPLITS = ("fitness", "validation", "test")


def _table(rows: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    cols = sorted(
        {(s, t) for v in rows.values() for s, tv in v.items() for t in tv},
        key=lambda c: (_SPLITS.index(c[0]) if c[0] in _SPLITS else 3, c[0], c[1] == "mean", c[1]),
    )
    if not cols:
        return []
    head = "| model | " + " | ".join(f"{t} ({s})" for s, t in cols) + " |"
    sep = "|---|" + "---|" * len(cols)
    body = [
        f"| {name} | "
        + " | ".join(f"{v.get(s, {}).get(t, float('nan')):.4f}" for s, t in cols)
        + " |"
        for name, v in rows.items()
    ]
    return [head, sep, *body]


def _against_baselines(
    best: dict[str, dict[str, float]], baselines: dict[str, Any], unscored: int = 0
) -> list[str]:
    """Per split: the best's mean beside the strongest baseline's, scored in this run
    (``unscored``: baselines that could not be scored, so not among them)."""
    lines = []
    which = f"{unscored} baseline(s) could not be scored" if unscored else "every baseline scored"
    for split in ("fitness", "validation", "test"):
        mine = (best.get(split) or {}).get("mean")
        theirs = {
            name: v[split]["mean"]
            for name, v in baselines.items()
            if "mean" in (v.get(split) or {})
        }
        if mine is None or not theirs:
            continue
        top = max(theirs, key=lambda name: theirs[name])
        lines.append(
            f"- {split} mean: best {mine:.4f}, strongest baseline {top} {theirs[top]:.4f} "
            f"({mine - theirs[top]:+.4f}; {which} in this run)"
        )
    return lines


def _archive_lines(stage: str | None, history: ArchiveHistory, scored: bool) -> list[str]:
    """One line per archive: elites, coverage, best quality against its expert's, QD score;
    ``scored``: the run's summary scored each archive's best elite (a finished run)."""
    where = f" (stage {stage})" if stage else ""
    lines = ["", f"## CycleQD archives{where}", ""]
    lines += [
        "| quality task | elites | coverage | best quality | its expert | QD score |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for task, archive in zip(history.tasks, history.archives, strict=True):
        st = archive.stats()
        expert = history.experts.get(task, "?")
        seeded = history.seed_qualities.get(task, float("nan"))
        lines.append(
            f"| {task} | {st.num_elites} | {100 * st.coverage:.1f} % of {archive.cells} "
            f"| {st.best_quality:.4f} | {expert} {seeded:.4f} | {st.qd_score:.2f} |"
        )
    lines.append("")
    scores = (
        "The best elite of each archive is scored on every split in the table above "
        "(`best-<task>`). "
        if scored
        else "The best elite of each archive is scored on every split once the run ends. "
    )
    lines.append(
        f"Qualities are train means. {scores}`shoal export RUN --list` lists every elite "
        "and `--elite TASK:CELL` writes one as a checkpoint."
    )
    suffix = f"-{stage}" if stage else ""
    lines += ["", f"![archives](archives{suffix}.png)", f"![qd](qd{suffix}.png)"]
    return lines


def summary_markdown(data: RunData) -> str:
    """Markdown text of the report summary."""
    s = data.summary
    lines = [f"# Run {data.root.name}", ""]
    lines.append(f"- status: {s.get('status', 'running or interrupted')}")
    lines.append(f"- evaluations: {s.get('evaluations', len(data.events))}")
    if "wall_seconds" in s:
        lines.append(f"- wall time: {float(s['wall_seconds']):.1f} s")
    for st in s.get("stages", []):
        if "merge" in st:  # a fixed merge step
            lines.append(f"- stage {st.get('stage')}: fixed merge of {st['merge']}")
            continue
        lines.append(
            f"- stage {st.get('stage')}: {st.get('algorithm')}, {st.get('evaluations')} "
            f"evaluations, {st.get('stop_reason')}"
        )
    if s.get("stop_reason"):
        lines.append(f"- stopped: {s['stop_reason']}")
    errors = sum(1 for e in data.events if e.get("error"))
    if errors:
        lines.append(f"- failed candidates: {errors}")
    for name, error in (s.get("failed_at_the_end") or {}).items():
        lines.append(f"- could not be built or scored at the end: {name} ({error})")
    best = s.get("best") or {}
    if best:
        lines += ["", "## Best", ""]
        lines.append(f"- evaluation {best.get('evaluation')}, fitness {best.get('fitness')}")
        lines.append(f"- checkpoint: `{best.get('path')}`")
        rows = {"best": best.get("scores", {})}
        rows.update(s.get("baselines") or {})
        rows.update({k: v.get("scores", {}) for k, v in (s.get("specialists") or {}).items()})
        lines += ["", *_table(rows)]
        unscored = sum(
            k.rsplit(": ", 1)[-1].startswith("baseline ") for k in s.get("failed_at_the_end") or {}
        )
        against = _against_baselines(best.get("scores", {}), s.get("baselines") or {}, unscored)
        if against:
            lines += ["", *against]
    for stage, history in data.archives.items():
        lines += _archive_lines(stage, history, scored=bool(s.get("specialists")))
    lines += ["", "![fitness](fitness.png)", "![tasks](tasks.png)", "![parameters](parameters.png)"]
    return "\n".join(lines) + "\n"
