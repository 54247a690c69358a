"""The files of a run folder (DESIGN.md, "A run folder"), each written atomically.

``config.yaml`` (resolved config), ``state.json`` (algorithm state + runner counters after
the last completed batch), ``events.jsonl`` (one line per evaluated candidate),
``store/``, ``best/``, ``summary.json``, ``report/``. A multi-stage run keeps one such
folder per stage under ``stages/<name>/`` and a top-level summary. ``.lock`` is the lock
file a writer holds (its pid inside); readers take no lock.

Reading is forgiving only where a kill leaves a mark: a torn last line of ``events.jsonl``
is left out. Any other file that does not parse is a :class:`StateError` naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from shoal._atomic import remove_stale_temp_files, remove_stale_temp_siblings, write_text_atomic
from shoal.errors import StateError

__all__ = ["EventLog", "RunFolder"]


class EventLog:
    """``events.jsonl``: appended one line per candidate, truncated on resume."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, events: list[dict[str, Any]]) -> None:
        """Append events (one JSON line each) and flush them to disk.

        Raises:
            OSError: The disk refused the write (naming the file); a torn last line is
                left out on resume.
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                for e in events:
                    fh.write(json.dumps(e, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.path)) from exc

    def read(self) -> list[dict[str, Any]]:
        """Every complete event line (a torn last line is ignored).

        Raises:
            StateError: A line before the last is not a JSON object (naming file and line).
        """
        return self._scan()[0]

    def seed_of(self, evaluation: int | None) -> int:
        """The seed the run built evaluation ``evaluation`` with (0: not logged)."""
        for event in self.read() if evaluation is not None else []:
            if event.get("evaluation") == evaluation:
                return int(event.get("seed") or 0)
        return 0

    def _scan(self) -> tuple[list[dict[str, Any]], bool]:
        """The events, and whether a torn last line (a killed run's partial write) was left out."""
        if not self.path.is_file():
            return [], False
        with self.path.open(encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
        events: list[dict[str, Any]] = []
        for n, line in enumerate(lines, 1):
            event = _event_line(line)
            if event is None and n == len(lines):
                return events, True
            if event is None:
                raise StateError(f"{self.path}:{n}: not an event line (a JSON object)")
            events.append(event)
        return events, False

    def truncate(self, count: int) -> None:
        """Keep the first ``count`` events (those the saved state knows), atomically."""
        events, torn = self._scan()
        if len(events) < count:
            raise StateError(
                f"{self.path}: holds {len(events)} events but the saved state counts {count}"
            )
        if len(events) == count and self.path.is_file() and not torn:
            return
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in events[:count])
        write_text_atomic(self.path, text)


def _event_line(line: str) -> dict[str, Any] | None:
    """The event a line holds; ``None`` for a partial or corrupt line."""
    if not line.endswith("\n"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


class RunFolder:
    """Paths of one run (or stage) folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def lock(self) -> Path:
        """The lock file a writer of the run holds (:func:`shoal._atomic.hold_lock`)."""
        return self.root / ".lock"

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

    def own_names(self) -> tuple[str, ...]:
        """Names of everything a run writes directly in its folder (``svd/``: CycleQD's
        cached SVD factors, written by the workers beside ``store/``)."""
        paths = (self.config, self.state, self.events.path, self.store, self.best, self.summary)
        return (*(p.name for p in paths), self.report.name, "stages", "svd")

    def stage(self, name: str) -> RunFolder:
        """The folder of stage ``name``."""
        return RunFolder(self.root / "stages" / name)

    def read_state(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` if there is none.

        Raises:
            StateError: The file is not a JSON object (one line naming it).
        """
        return _read_json(self.state)

    def saved_events(self) -> list[dict[str, Any]]:
        """The events the saved state counts — those ``--resume`` keeps (a run stopped
        between a checkpoint's event lines and its state logged more); all of them when
        no state is saved."""
        events = self.events.read()
        runner = (self.read_state() or {}).get("runner") or {}
        return events[: int(runner.get("evaluations", len(events)))]

    def write_state(self, state: dict[str, Any]) -> None:
        """Save the state atomically.

        Keys keep their order: recipes in the state come back as they were asked, so a
        resumed run writes its best's recipe (``shoal_recipe.yaml``, the summary) byte
        for byte as an uninterrupted one.
        """
        write_text_atomic(self.state, json.dumps(state))

    def read_summary(self) -> dict[str, Any] | None:
        """The summary, or ``None``.

        Raises:
            StateError: The file is not a JSON object (one line naming it).
        """
        return _read_json(self.summary)

    def has_state(self) -> bool:
        """Whether any batch of the run (of any stage) was saved."""
        return self.state.is_file() or any((self.root / "stages").glob("*/state.json"))

    def has_evaluations(self) -> bool:
        """Whether the run saved a batch or logged an evaluation (of any stage)."""
        logs = [self.events.path, *(self.root / "stages").glob("*/events.jsonl")]
        return self.has_state() or any(p.is_file() and p.stat().st_size > 0 for p in logs)

    def unstarted_names(self) -> tuple[str, ...]:
        """What a run killed before its first evaluation may leave, besides the lock."""
        return (self.config.name, self.events.path.name, self.store.name, "stages", "svd")

    def remove_leftovers(self) -> None:
        """Delete temporary siblings (``.state.json.tmp-<pid>``, ``.best.old-<pid>``, ...)
        of the run's files whose writer has ended, and those of the models in ``store/``
        and ``svd/`` (a worker killed while it wrote one); for the holder of :attr:`lock`."""
        stages = self.root / "stages"
        folders = [self, *(RunFolder(p) for p in sorted(stages.glob("*")) if p.is_dir())]
        for folder in folders:
            for name in folder.own_names():
                remove_stale_temp_siblings(folder.root / name)
            for sub in (folder.store, folder.root / "svd"):
                remove_stale_temp_files(sub)


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` if there is no such file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except json.JSONDecodeError as exc:
        raise StateError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise StateError(f"{path}: expected a JSON object")
    return data
