"""A CycleQD run's archives, read back: every elite as a row, one elite or the aggregation
written as a checkpoint (``shoal export``).

The elites live in the run's state (``state.json``: recipe, train means, evaluation) and
their weights in the run's store (CycleQD keeps every elite still in some archive), so an
elite is rebuilt from the store — the exact weights the run scored — and written with a
model card. The aggregation is the run's own final merge when it got that far, else the
same merge (METHODS.md §4) over the archives as they stand.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal._yaml import safe_dump
from shoal.errors import RecipeError, ShoalError, StateError
from shoal.search.run_folder import RunFolder

__all__ = ["EliteRow", "QDRun", "open_qd_run"]


@dataclass(frozen=True)
class EliteRow:
    """One elite of one archive.

    Attributes:
        task: The archive's quality task.
        cell: Its cell, one index per behaviour axis.
        quality: Its mean on ``task`` (train).
        means: Its mean on every skill task (train).
        evaluation: The evaluation that made it.
        ref: A seed's model name (an expert's, or one of ``seeds``) or ``store:<key>``.
        recipe: How it was built.
    """

    task: str
    cell: tuple[int, ...]
    quality: float
    means: dict[str, float]
    evaluation: int
    ref: str
    recipe: dict[str, Any]

    @property
    def cell_text(self) -> str:
        """The cell as ``--elite`` spells it: ``i,j``."""
        return ",".join(str(i) for i in self.cell)


class QDRun:
    """The CycleQD part of a run folder (the run itself or one stage of it).

    Use :func:`open_qd_run`.
    """

    def __init__(self, run: RunFolder, folder: RunFolder, stage: str | None) -> None:
        self.run, self.folder, self.stage = run, folder, stage
        saved = folder.read_state() or {}
        self.saved: dict[str, Any] = saved["algorithm"]
        self.state: dict[str, Any] = self.saved["state"]
        self.tasks: list[str] = [str(t) for t in self.state["tasks"]]

    def elites(self) -> list[EliteRow]:
        """Every elite, archive by archive (tasks in cycling order), cells in order."""
        rows = []
        for task, archive in zip(self.tasks, self.state["archives"] or [], strict=False):
            for e in archive["elites"]:
                data = e["data"]
                rows.append(
                    EliteRow(
                        task,
                        tuple(int(i) for i in e["cell"]),
                        float(e["quality"]),
                        dict(zip(self.tasks, map(float, data["means"]), strict=True)),
                        int(data["evaluation"]),
                        str(data["ref"]),
                        data["recipe"],
                    )
                )
        return rows

    def elite(self, which: str) -> EliteRow:
        """The elite ``TASK:CELL`` (``CELL`` = ``i,j`` as listed, or ``best``).

        Raises:
            RecipeError: A malformed spec, an unknown task, or an empty cell.
        """
        task, sep, cell = which.rpartition(":")
        if not sep or not task or not cell:
            raise RecipeError(f"--elite {which!r}: give TASK:CELL, e.g. {self.tasks[0]}:3,7")
        if task not in self.tasks:
            raise RecipeError(f"--elite {which!r}: no archive {task!r} (have {self.tasks})")
        rows = [r for r in self.elites() if r.task == task]
        if cell == "best":
            if not rows:
                raise RecipeError(f"--elite {which!r}: archive {task!r} is empty")
            return max(rows, key=lambda r: r.quality)  # first maximum in cell order
        try:
            index = tuple(int(i) for i in cell.split(","))
        except ValueError:
            raise RecipeError(f"--elite {which!r}: CELL is i,j (integers) or 'best'") from None
        axes = [t for t in self.tasks if t != task]
        bins = int(self.state["options"]["bins"])
        if len(index) != len(axes) or not all(0 <= i < bins for i in index):
            raise RecipeError(
                f"--elite {which!r}: CELL is {len(axes)} indices in 0..{bins - 1}, one per "
                f"behaviour axis ({', '.join(axes)})"
            )
        for r in rows:
            if r.cell == index:
                return r
        raise RecipeError(
            f"--elite {which!r}: cell {cell} of archive {task!r} is empty "
            f"(shoal export {self.run.root} --list shows the elites)"
        )

    def aggregate_recipe(self) -> dict[str, Any]:
        """The run's aggregation if it was evaluated, else the same merge of the archives now."""
        if self.state.get("aggregate"):
            return dict(self.state["aggregate"]["recipe"])
        from shoal.search.algorithms.cycleqd import CycleQD

        algo = CycleQD(self.state["options"], self.state["base"], task_names=self.tasks)
        algo.load_state_dict(self.saved)
        if algo.options.aggregate == "none" or not self.state["archives"]:
            raise RecipeError(
                f"{self.folder.root}: the run has no aggregation "
                "(algorithm.aggregate: none, or no archive yet)"
            )
        return algo.aggregate_recipe()

    def export(
        self,
        recipe: dict[str, Any],
        out: Path,
        *,
        evaluation: int | None,
        title: str,
        facts: list[str],
    ) -> Path:
        """Build ``recipe`` as the run built it and write it to ``out`` with a model card.

        The store's copy is used when the run kept the model (the exact weights scored);
        otherwise the recipe is built with the seed of ``evaluation``.
        """
        from shoal.executors.store import open_store
        from shoal.executors.worker import Worker
        from shoal.search.algorithms.base import store_key, store_ref
        from shoal.search.config import load_config
        from shoal.search.export import export_model
        from shoal.search.runner import worker_spec

        cfg = load_config(self.run.config)
        models = dict(cfg.models)
        for name in _stage_names(self.run):  # earlier stages' results, as recipes name them
            if (self.run.stage(name).best).is_dir():
                models[name] = str(self.run.stage(name).best.resolve())
        self._refuse_out(out, models)
        store_spec = {"kind": "dir", "path": str(self.folder.store)}
        spec = worker_spec(cfg, models, store_spec, tasks=False)
        with Worker(spec, store=open_store(store_spec)) as worker:
            build = {"model": store_ref(recipe)} if store_key(recipe) in worker.store else recipe
            seed = self.folder.events.seed_of(evaluation)
            model = worker.build(build, seed)
            card = _card(title, facts, recipe, self.run.root)
            export_model(
                model, recipe, out, tokenizer=worker.tokenizer, seed=seed, models=models, card=card
            )
        return out

    def _refuse_out(self, out: Path, models: Mapping[str, str]) -> None:
        """Refuse an output that would replace the run, its models or the working folder:
        inside the run folder, or an existing folder or file that is or holds one of them
        (``--overwrite`` deletes what it replaces)."""
        from shoal._atomic import refuse_output_holding
        from shoal.errors import OutputExistsError

        root = self.run.root.resolve()
        target = out.resolve()
        if target == root or root in target.parents:
            raise OutputExistsError(
                f"{out}: is the run folder {self.run.root} or inside it; write elsewhere"
            )
        inputs: dict[str, str | Path] = {f"the run folder {self.run.root}": self.run.root}
        inputs |= {f"the run's model {name!r} ({path})": path for name, path in models.items()}
        refuse_output_holding(out, inputs)


def _stage_names(run: RunFolder) -> list[str]:
    stages = run.root / "stages"
    return sorted(p.name for p in stages.iterdir() if p.is_dir()) if stages.is_dir() else []


def _is_qd(folder: RunFolder) -> bool:
    try:
        saved = folder.read_state() or {}
    except StateError:
        return False
    return (saved.get("algorithm") or {}).get("algorithm") == "cycleqd"


def _planned_qd(run: RunFolder) -> list[str]:
    """The stages whose config is CycleQD (``""``: a one-stage CycleQD run), saved or not."""
    from shoal.search.config import load_config

    try:
        cfg = load_config(run.config)
    except ShoalError:  # no config to read: nothing was planned that we can name
        return []
    if (cfg.algorithm or {}).get("name") == "cycleqd":
        return [""]
    return [s.name for s in cfg.stages or [] if (s.algorithm or {}).get("name") == "cycleqd"]


def _nothing_saved(run: RunFolder, stage: str) -> StateError:
    where = f"stage {stage!r}" if stage else "run"
    return StateError(
        f"{run.root}: its CycleQD {where} has saved nothing yet (no state.json); continue "
        f"it with `shoal evolve --resume --run-dir {run.root}`"
    )


def open_qd_run(run_dir: str | Path, stage: str | None = None) -> QDRun:
    """The CycleQD run in ``run_dir`` (or its stage ``stage``; found alone when only one is).

    Raises:
        StateError: No run folder, no CycleQD state there, or several CycleQD stages and
            none named.
    """
    run = RunFolder(run_dir)
    if not run.config.is_file():
        raise StateError(f"{run.root}: not a run folder (no config.yaml)")
    if stage is not None:
        names = _stage_names(run)
        if stage not in names:
            have = ", ".join(names) if names else "none: a one-stage run, drop --stage"
            raise StateError(f"--stage {stage!r}: {run.root} has no such stage (stages: {have})")
        folder = run.stage(stage)
        if not _is_qd(folder):
            if stage in _planned_qd(run):
                raise _nothing_saved(run, stage)
            qd = [n for n in names if _is_qd(run.stage(n))]
            raise StateError(
                f"--stage {stage!r}: not a CycleQD stage with a saved state "
                f"(CycleQD stages: {', '.join(qd) or 'none'})"
            )
        return QDRun(run, folder, stage)
    if _is_qd(run):
        return QDRun(run, run, None)
    found = [n for n in _stage_names(run) if _is_qd(run.stage(n))]
    if len(found) == 1:
        return QDRun(run, run.stage(found[0]), found[0])
    if found:
        raise StateError(f"{run.root}: several CycleQD stages ({', '.join(found)}); name one")
    planned = _planned_qd(run)
    if planned:
        raise _nothing_saved(run, planned[0])
    raise StateError(f"{run.root}: no saved CycleQD state (export reads CycleQD runs)")


def _card(title: str, facts: list[str], recipe: Mapping[str, Any], run: Path) -> str:
    """The model card (README.md) of an exported elite or aggregation."""
    from shoal import __version__

    lines = "\n".join(f"- {f}" for f in facts)
    return (
        "---\ntags:\n- shoal\n- cycleqd\n- merge\n---\n\n"
        f"# {title}\n\n"
        f"Exported with shoal {__version__} on {_dt.date.today().isoformat()} by "
        f"`shoal export` from the CycleQD run `{run}`, without training.\n\n"
        f"{lines}\n\n"
        "## Recipe\n\n"
        "As the run asked for it (`store:<key>` names a model of the run's store); "
        "`shoal_recipe.yaml` beside this card holds it with every model's path.\n\n"
        f"```yaml\n{safe_dump(dict(recipe), sort_keys=False)}```\n"
    )
