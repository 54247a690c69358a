"""Reading a run folder for the report: events (all stages, in order) and the summary."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.errors import StateError
from shoal.search.run_folder import RunFolder

__all__ = ["RunData", "load_run", "numeric_leaves"]


@dataclass
class RunData:
    """What the plots are drawn from.

    Attributes:
        root: The run folder.
        events: Every event line, stages concatenated in order, each with ``stage`` and a
            run-wide ``step`` (0-based evaluation count over all stages).
        summary: The top-level ``summary.json`` (empty if the run has not finished).
        stages: Stage names in order (``[None]`` for a single-stage run).
        archives: Stage name (``None``: the run itself) -> its CycleQD archive history,
            filled by :func:`shoal.report.write_report`.
    """

    root: Path
    events: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    stages: list[str | None] = field(default_factory=list)
    archives: dict[str | None, Any] = field(default_factory=dict)

    def folders(self) -> list[tuple[str | None, RunFolder]]:
        """``(stage, folder)`` of the run itself or of each stage, in order."""
        folder = RunFolder(self.root)
        return [(s, folder if s is None else folder.stage(s)) for s in self.stages]


def load_run(run_dir: str | Path) -> RunData:
    """Load events and summary of a run folder (single or multi-stage).

    Raises:
        StateError: If the folder holds no run, or a file of it does not parse (one line
            naming the file; a torn last line of ``events.jsonl`` is left out).
    """
    folder = RunFolder(run_dir)
    if not folder.config.is_file() and not folder.events.path.is_file():
        raise StateError(f"{folder.root}: not a run folder (no config.yaml or events.jsonl)")
    summary = folder.read_summary() or {}
    stage_dirs: list[tuple[str | None, RunFolder]] = []
    stages_root = folder.root / "stages"
    if folder.events.path.is_file() or not stages_root.is_dir():
        stage_dirs.append((None, folder))
    if stages_root.is_dir():
        order = [s.get("stage") for s in summary.get("stages", [])]
        names = sorted(p.name for p in stages_root.iterdir() if p.is_dir())
        names.sort(key=lambda n: order.index(n) if n in order else len(order))
        stage_dirs.extend((n, folder.stage(n)) for n in names)
    events: list[dict[str, Any]] = []
    for name, sf in stage_dirs:
        for n, e in enumerate(sf.saved_events(), 1):
            _check_event(e, f"{sf.events.path}:{n}")
            events.append({**e, "stage": name, "step": len(events)})
    return RunData(folder.root, events, summary, [n for n, _ in stage_dirs])


def _check_event(event: dict[str, Any], where: str) -> None:
    """The fields the plots read are there, with the right types."""
    for key, kind in (("fitness", (int, float)), ("means", dict), ("recipe", dict)):
        if not isinstance(event.get(key), kind) or isinstance(event.get(key), bool):
            raise StateError(f"{where}: event lacks {key!r} (or it has the wrong type)")


def numeric_leaves(obj: Any, prefix: str = "") -> dict[str, float]:
    """Flatten the numbers inside a recipe's ``parameters`` (and nested lists) to paths.

    ``{"models": [{"model": "a", "parameters": {"weight": 0.3}}]}`` gives
    ``{"a.weight": 0.3}``; list values get ``[i]`` suffixes.
    """
    out: dict[str, float] = {}
    if isinstance(obj, bool):
        return out
    if isinstance(obj, int | float):
        out[prefix or "value"] = float(obj)
    elif isinstance(obj, dict):
        label = obj.get("model") if isinstance(obj.get("model"), str) else None
        for k, v in obj.items():
            if k in ("model", "merge_method", "base_model", "dtype", "out_dtype"):
                continue
            if k == "parameters" and label is not None:
                out.update(numeric_leaves(v, f"{_short(label)}"))
            elif k in ("parameters", "models"):
                out.update(numeric_leaves(v, prefix))
            else:
                out.update(numeric_leaves(v, f"{prefix}.{k}" if prefix else k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            if isinstance(v, dict) and "model" in v:
                out.update(numeric_leaves(v, prefix))
            else:
                out.update(numeric_leaves(v, f"{prefix}[{i}]"))
    return out


def _short(ref: str) -> str:
    return Path(ref).name if "/" in ref else ref


def dumps(data: Any) -> str:
    """JSON text for the report files."""
    return json.dumps(data, indent=2, default=str)
