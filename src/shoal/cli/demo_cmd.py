"""``shoal demo``: M2N2 from scratch on sklearn's digits, through ``shoal evolve``'s run loop.

The demo is an ordinary evolve run of :data:`DEMO_CONFIG` (the same search as
``examples/m2n2-digits-scratch.yaml``), so its folder is a run folder like any other:
``shoal report`` redraws it and ``shoal evolve --resume`` continues it. The command
body imports torch and the library, so ``shoal --help`` stays fast.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import typer

__all__ = ["DEMO_CONFIG", "register"]

#: the demo's run config: examples/m2n2-digits-scratch.yaml, the published budget
DEMO_CONFIG: dict[str, Any] = {
    "models": {},
    "loader": {"type": "callable", "target": "shoal.testbed.images:digits_mlp"},
    "tasks": {
        "fitness": [
            {
                "type": "python",
                "target": "shoal.testbed.images:image_task",
                "options": {"data": "digits", "split": "train"},
            }
        ],
        "test": [
            {
                "type": "python",
                "target": "shoal.testbed.images:image_task",
                "options": {"data": "digits", "split": "test"},
            }
        ],
    },
    "algorithm": {
        "name": "m2n2",
        "init": "scratch",
        "archive_size": 20,
        "alpha": 1.0,
        "matchmaker": "attraction",
        "splitpoint": True,
        "angle": "segment",
    },
    "budget": {"evaluations": 50_000},
    "batch_size": 1,
    "executor": {"type": "serial"},
    "seed": 0,
}

_HELP = """Evolve a digits classifier from random weights with M2N2 — no gradients.

An archive of 20 MLPs (64-256-10) starts from N(0, 0.01²); each step
merges two members with a split-point SLERP, adds a little noise and keeps
the archive's fittest under resource competition (METHODS.md §3). This is
`shoal evolve` of examples/m2n2-digits-scratch.yaml: it runs on the CPU
(1–2 minutes for the published 50,000 evaluations on a 2-core
machine), writes a run folder (best/, summary.json, events.jsonl, report/)
and prints where it is.

A finished demo folder is replaced by the next demo; an interrupted one is
continued (same --evaluations and --seed) or replaced (others). Any other
folder is refused.

\b
    shoal demo
    shoal demo --evaluations 5000 --run-dir .demo/quick --seed 1
"""


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the ``shoal`` app."""

    @app.command("demo", help=_HELP)
    def demo_cmd(
        # a string, not a Path: typer would read an empty --run-dir as "." (this folder)
        run_dir: str = typer.Option(".demo/run", "--run-dir", help="Run folder to write."),
        evaluations: int = typer.Option(
            50_000, "--evaluations", min=100, help="Child evaluations (the published budget)."
        ),
        seed: int = typer.Option(0, "--seed", min=0, help="Root seed."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    ) -> None:
        from shoal.cli.evolve_cmd import run_and_report

        config = {**DEMO_CONFIG, "budget": {"evaluations": evaluations}, "seed": seed}
        resume = _clear_previous(Path(run_dir), config)
        summary = run_and_report(
            None if resume else config,
            run_dir,
            resume=resume,
            progress=False if no_progress else None,
        )
        test = (summary.get("best") or {}).get("scores", {}).get("test", {})
        if "digits-test" in test:
            typer.echo(f"test accuracy of the best-training member: {test['digits-test']:.3f}")


def _clear_previous(run_dir: Path, config: dict[str, Any]) -> bool:
    """Make room for the demo in ``run_dir``; True when an interrupted demo is to be resumed.

    Only a folder the demo wrote is touched: its saved config is the demo's but for the
    budget and the seed, and it holds nothing but a run's own files. Its lock is held
    while it is checked and emptied, so a demo still running there is never disturbed.

    Raises:
        OutputExistsError: ``run_dir`` holds something that is not a demo run.
        StateError: Another process is writing to ``run_dir`` (its pid named).
    """
    from shoal._atomic import hold_lock
    from shoal.errors import OutputExistsError, ShoalError, StateError
    from shoal.search.config import load_config
    from shoal.search.run_folder import RunFolder

    folder = RunFolder(run_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return False  # evolve says what is wrong with a file or a path under one
    refusal = OutputExistsError(f"{run_dir}: exists and is not a demo run; pick another --run-dir")
    if _old_demo(run_dir):  # the demo's own folder from before it ran through evolve
        shutil.rmtree(run_dir)
        return False
    with hold_lock(folder.lock, str(run_dir), error=StateError):
        folder.remove_leftovers()  # of killed writers
        own = {*folder.own_names(), folder.lock.name}
        if any(p.name not in own for p in run_dir.iterdir()):
            raise refusal  # a file of the user's, or a writer's leftover
        try:
            saved = load_config(folder.config).model_dump(mode="json")
            ours = load_config(config).model_dump(mode="json")
        except ShoalError:
            raise refusal from None
        free = ("budget", "seed", "root", "progress", "checkpoint_seconds")
        if any(saved.get(k) != v for k, v in ours.items() if k not in free):
            raise refusal
        summary = folder.read_summary() or {}
        same = saved["budget"] == ours["budget"] and saved["seed"] == ours["seed"]
        if summary.get("status") != "completed" and same and folder.has_state():
            return True
        for name in folder.own_names():  # the lock file stays: it is held
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    return False


def _old_demo(run_dir: Path) -> bool:
    """A folder written by ``shoal demo`` before 2026-12 (an in-memory driver, its own
    layout: summary.json says ``kind: m2n2-image``) and nothing else."""
    import json

    layout = {"config.yaml", "state.json", "store.safetensors", "best", "history.jsonl"}
    names = {p.name for p in run_dir.iterdir()}
    if not names <= layout | {"summary.json", "report"}:
        return False
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("kind") == "m2n2-image"
