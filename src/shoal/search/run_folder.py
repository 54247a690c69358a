"""The files of a run folder (DESIGN.md, "A run folder"), each written atomically.

``config.yaml`` (resolved config), ``state.json`` (algorithm state + runner counters after
the last completed batch), ``events.jsonl`` (one line per evaluated candidate),
``store/``, ``best/``, ``summary.json``, ``report/``. A multi-stage run keeps one such
folder per stage under ``stages/<name>/`` and a top-level summary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shoal.errors import StateError

__all__ = ["EventLog", "RunFolder", "write_atomic"]


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, fsync, rename onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class EventLog:
    """``events.jsonl``: appended one line per candidate, truncated on resume."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, events: list[dict[str, Any]]) -> None:
        """Append events (one JSON line each) and flush them to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            for e in events:
                fh.write(json.dumps(e, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        """Every complete event line (a torn last line is ignored)."""
        return list(self._iter())

    def _iter(self) -> Iterator[dict[str, Any]]:
        if not self.path.is_file():
            return
        with self.path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    return  # torn write of a killed run
                yield json.loads(line)

    def truncate(self, count: int) -> None:
        """Keep the first ``count`` events (those the saved state knows), atomically."""
        events = self.read()
        if len(events) < count:
            raise StateError(
                f"{self.path}: holds {len(events)} events but the saved state counts {count}"
            )
        if len(events) == count and self.path.is_file() and self._clean_end():
            return
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in events[:count])
        write_atomic(self.path, text)

    def _clean_end(self) -> bool:
        data = self.path.read_bytes()
        return not data or data.endswith(b"\n")


class RunFolder:
    """Paths of one run (or stage) folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def events(self) -> EventLog:
        return EventLog(self.root / "events.jsonl")

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report(self) -> Path:
        return self.root / "report"

    def stage(self, name: str) -> RunFolder:
        """The folder of stage ``name``."""
        return RunFolder(self.root / "stages" / name)

    def read_state(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` if there is none."""
        if not self.state.is_file():
            return None
        try:
            data: dict[str, Any] = json.loads(self.state.read_text())
        except json.JSONDecodeError as exc:
            raise StateError(f"{self.state}: not valid JSON ({exc.msg})") from None
        return data

    def write_state(self, state: dict[str, Any]) -> None:
        """Save the state atomically."""
        write_atomic(self.state, json.dumps(state, sort_keys=True))

    def read_summary(self) -> dict[str, Any] | None:
        """The summary, or ``None``."""
        if not self.summary.is_file():
            return None
        data: dict[str, Any] = json.loads(self.summary.read_text())
        return data
