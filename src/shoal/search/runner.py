"""The run loop of ``shoal evolve``: ask → evaluate → tell → log → checkpoint, until a stop.

Per batch: the algorithm asks for recipes; each becomes a :class:`WorkItem` whose seed is
derived from (stage seed, batch, position) so every executor builds the same models; the
executor returns per-example scores; the algorithm is told; one event line per candidate
is appended to ``events.jsonl``; models the algorithm still refers to are made durable in
the store; the state is written atomically; then unreferenced store entries are dropped.
A killed run resumes from the last written state (extra event lines are cut) and ends
exactly as an uninterrupted one would. Before anything is written the config is checked as
far as it can be without evaluating a candidate (:func:`~shoal.search.preflight.check_run`);
an error before the first batch is saved leaves the run folder as it was.

Stops on: evaluation budget, wall time, target fitness, the algorithm's ``stop()``, or
Ctrl-C (the batch in flight finishes and is saved; a second Ctrl-C aborts at once).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from shoal._atomic import (
    hold_lock,
    replace_dir,
    temp_sibling,
    write_text_atomic,
)
from shoal.errors import (
    CheckpointError,
    OutputExistsError,
    RecipeError,
    ShoalError,
    StateError,
    TaskError,
)
from shoal.executors import (
    WorkerSpec,
    WorkItem,
    WorkResult,
    candidate_seed,
    make_executor,
    open_store,
)
from shoal.executors.worker import Worker
from shoal.search.algorithms.base import Algorithm, Best, store_key, store_ref
from shoal.search.config import Budget, RunConfig, load_config
from shoal.search.context import algorithm_key, make_algorithm, prefix_error
from shoal.search.export import export_model
from shoal.search.preflight import check_run, model_refs
from shoal.search.progress import RunProgress
from shoal.search.run_folder import RunFolder

__all__ = ["RunResult", "evolve"]

STATE_FORMAT = 1
#: config keys a resumed run may change: they do not change its results
_FREE_ON_RESUME = ("executor", "checkpoint_seconds")


@dataclass
class RunResult:
    """What a run (or stage) ended with.

    Attributes:
        run_dir: The run folder.
        status: ``completed`` or ``interrupted``.
        stop_reason: Why the loop stopped.
        evaluations: Candidates evaluated.
        wall_seconds: Search time, summed over resumed sessions.
        best: The algorithm's best candidate.
        summary: The content of ``summary.json``.
    """

    run_dir: Path
    status: str
    stop_reason: str
    evaluations: int
    wall_seconds: float
    best: Best | None
    summary: dict[str, Any] = field(default_factory=dict)


class _Interrupt:
    """First Ctrl-C: finish the batch and stop; second: abort (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.requested = False

    def handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this batch (state is saved; Ctrl-C again aborts)", flush=True)


@contextmanager
def _sigint(flag: _Interrupt) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, flag.handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _stop_reason(
    algo: Algorithm,
    budget: Budget,
    evaluations: int,
    wall: float,
    flag: _Interrupt,
    best: Best | None,
) -> str | None:
    if flag.requested:
        return "interrupted"
    if budget.evaluations is not None and evaluations >= budget.evaluations:
        return f"evaluation budget ({budget.evaluations}) reached"
    if budget.seconds is not None and evaluations > 0 and wall >= budget.seconds:
        return f"wall-time budget ({budget.seconds:g} s) reached"
    if budget.target is not None and best is not None and best.fitness >= budget.target:
        return f"target fitness {budget.target:g} reached"
    reasons = algo.stop()
    if reasons:
        return "algorithm: " + "; ".join(reasons)
    return None


def _means(scores: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.mean(v)) if len(v) else 0.0 for k, v in scores.items()}


def _event(item: WorkItem, res: WorkResult, generation: int) -> dict[str, Any]:
    means = _means(res.scores)
    values = list(means.values())
    return {
        "evaluation": item.index,
        "generation": generation,
        "recipe": item.recipe,
        "seed": item.seed,
        "means": means,
        # one task's mean is its own (np.mean of one value, without the call)
        "fitness": values[0] if len(values) == 1 else float(np.mean(values)) if values else 0.0,
        "seconds": round(res.seconds, 6),
        "build_seconds": round(res.build_seconds, 6),
        "worker": res.worker,
        "error": res.error,
    }


@dataclass
class _Stage:
    """Everything one stage of a run needs."""

    config: RunConfig
    folder: RunFolder
    block: dict[str, Any]
    budget: Budget
    models: dict[str, str]
    seed: int
    executor: str
    progress: bool
    label: str
    ray_init: dict[str, Any] | None = None
    key: str = "algorithm"  # config key of the algorithm block, for messages
    task_sizes: dict[str, int] = field(default_factory=dict)  # fitness tasks, from the checks
    best_key: tuple[dict[str, Any], str] | None = None  # the best's recipe and store key


def worker_spec(
    cfg: RunConfig,
    models: dict[str, str],
    store: dict[str, Any],
    *,
    tasks: bool = True,
    threads: int | None = None,
) -> WorkerSpec:
    """What a worker of a run of ``cfg`` needs: its loader, models, store and device, and
    (``tasks``) the fitness tasks and, as extra tasks, the validation and test ones."""
    return WorkerSpec(
        loader=cfg.loader.model_dump(mode="json"),
        models=dict(models),
        base_model=cfg.base_model,
        tasks=[dict(t) for t in cfg.tasks.fitness] if tasks else [],
        extra_tasks=[dict(t) for t in [*cfg.tasks.validation, *cfg.tasks.test]] if tasks else [],
        store=store,
        device=cfg.executor.device,
        root=cfg.root,
        threads=threads,
    )


def _worker_spec(st: _Stage, store: dict[str, Any]) -> WorkerSpec:
    workers = st.config.executor.workers if st.executor != "serial" else 1
    threads = max(1, (os.cpu_count() or 1) // workers) if st.executor != "serial" else None
    return worker_spec(st.config, st.models, store, threads=threads)


def _make_algorithm(st: _Stage, task_sizes: dict[str, int]) -> Algorithm:
    return make_algorithm(
        st.config, st.block, st.models, st.seed, task_sizes, label=st.label, where=st.key
    )


def _run_stage(st: _Stage) -> RunResult:
    cfg, folder = st.config, st.folder
    store_spec = (
        {"kind": "memory", "path": str(folder.store)}
        if st.executor == "serial"
        else {"kind": "dir", "path": str(folder.store)}
    )
    spec = _worker_spec(st, store_spec)
    store = open_store(store_spec)
    saved = folder.read_state()
    counters: dict[str, Any] = {
        "generation": 0,
        "evaluations": 0,
        "wall_seconds": 0.0,
    }
    flag = _Interrupt()
    with make_executor(
        st.executor,
        spec,
        store=store,
        workers=cfg.executor.workers,
        address=cfg.executor.address,
        max_retries=cfg.executor.max_retries,
        gpus_per_worker=cfg.executor.gpus_per_worker,
        ray_init=st.ray_init,
        connect_timeout=cfg.executor.connect_timeout,
    ) as executor:
        local: Worker | None = getattr(executor, "worker", None)
        algo = _make_algorithm(st, st.task_sizes)
        if saved is not None:
            if saved.get("format_version") != STATE_FORMAT:
                raise StateError(f"{folder.state}: unknown format_version")
            algo.load_state_dict(saved["algorithm"])
            counters.update({k: v for k, v in saved["runner"].items() if k in counters})
        folder.events.truncate(int(counters["evaluations"]))
        progress = RunProgress(st.label, st.budget, enabled=st.progress)
        best = algo.best  # computed once a batch: M2N2's scans its whole archive
        progress.start(int(counters["evaluations"]), best)
        t0 = time.monotonic() - float(counters["wall_seconds"])
        checkpoint = _Checkpoint(folder, algo, store, counters, cfg.checkpoint_seconds)
        reason = None
        with _sigint(flag), progress:
            while True:
                done = int(counters["evaluations"])
                wall = time.monotonic() - t0
                reason = _stop_reason(algo, st.budget, done, wall, flag, best)
                if reason is not None:
                    break
                events, best = _one_batch(st, algo, executor, store, counters)
                checkpoint.pending += events
                counters["wall_seconds"] = time.monotonic() - t0
                checkpoint.maybe()
                progress.update(int(counters["evaluations"]), best)
            checkpoint.save()
        wall = float(counters["wall_seconds"])
        if reason == "interrupted":
            return RunResult(folder.root, "interrupted", reason, algo.evaluations, wall, algo.best)
        summary = _finish(st, algo, counters, local, spec, store, reason or "")
    return RunResult(
        folder.root, "completed", reason or "", algo.evaluations, wall, algo.best, summary
    )


class _Checkpoint:
    """Makes the run durable: events, the retained store entries, then the state.

    Every ``seconds`` (0: after every batch) and when the loop ends. Work items are
    seeded, so a run killed between checkpoints replays the batches since the last one
    on ``--resume`` and ends exactly as an uninterrupted run: the state is written last,
    and events beyond the count it holds are cut on resume.
    """

    def __init__(
        self,
        folder: RunFolder,
        algo: Algorithm,
        store: Any,
        counters: dict[str, Any],
        seconds: float,
    ) -> None:
        self.folder, self.algo, self.store, self.counters = folder, algo, store, counters
        self.seconds = seconds
        self.pending: list[dict[str, Any]] = []  # event lines since the last checkpoint
        self.saved_at = time.monotonic()
        self.saved = int(counters["evaluations"])

    def maybe(self) -> None:
        """Save if ``seconds`` have passed since the last checkpoint."""
        if time.monotonic() - self.saved_at >= self.seconds:
            self.save()

    def save(self) -> None:
        """Flush events and store, write the state, then drop store files it no longer names."""
        if int(self.counters["evaluations"]) == self.saved and not self.pending:
            return
        self.folder.events.append(self.pending)
        self.pending = []
        self.store.flush()
        self.folder.write_state(
            {
                "format_version": STATE_FORMAT,
                "algorithm": self.algo.state_dict(),
                "runner": self.counters,
            }
        )
        self.store.prune()
        self.saved_at = time.monotonic()
        self.saved = int(self.counters["evaluations"])


def _one_batch(
    st: _Stage,
    algo: Algorithm,
    executor: Any,
    store: Any,
    counters: dict[str, Any],
) -> tuple[list[dict[str, Any]], Best | None]:
    """Ask, evaluate, tell one batch; returns its event lines (not yet written), the best."""
    gen, start = int(counters["generation"]), int(counters["evaluations"])
    recipes = algo.ask(st.config.batch_size)
    keep = type(algo).keep_models
    items = [
        WorkItem(
            index=start + i,
            recipe=r,
            seed=candidate_seed(st.seed, gen, i),
            keep_as=store_key(r) if keep and "merge_method" in r else None,  # not a seed
        )
        for i, r in enumerate(recipes)
    ]
    results = executor.evaluate(items)
    fatal = next((r.error for r in results if r.fatal), None)
    if fatal is not None:  # a model of the config is broken: stop before telling
        raise CheckpointError(fatal)
    if start == 0 and results and all(r.error for r in results):
        raise TaskError(f"every candidate of the first batch failed; first: {results[0].error}")
    try:
        algo.tell(recipes, [_as_told(r) for r in results])
    except ShoalError as exc:  # the algorithm cannot go on (CycleQD: an expert failed)
        first = next((r.error for r in results if r.error), None)
        if first is None:
            raise
        raise type(exc)(f"{exc}; this batch's first failure: {first}") from None
    counters["generation"] = gen + 1
    counters["evaluations"] = start + len(items)
    best = algo.best
    if keep:
        refs = algo.references()  # a new set: the best's key joins it
        if best is not None:
            if st.best_key is None or st.best_key[0] is not best.recipe:
                st.best_key = (best.recipe, store_key(best.recipe))  # once per new best
            refs.add(st.best_key[1])
        store.retain(refs)
    return [_event(it, res, gen) for it, res in zip(items, results, strict=True)], best


def _as_told(result: WorkResult) -> dict[str, np.ndarray]:
    """The scores an algorithm is told: a failed candidate's as NaN, which every algorithm
    counts as the worst and none mistakes for a model that scored 0."""
    if result.error is None:
        return result.scores
    return {name: np.full(len(v), np.nan) for name, v in result.scores.items()}


@contextmanager
def _final_worker(local: Worker | None, spec: WorkerSpec) -> Iterator[Worker]:
    """The serial executor's worker, or one made for the end of the run and closed after
    it (the caller's torch thread count comes back)."""
    if local is not None:
        yield local
        return
    with Worker(spec, worker_id="main") as worker:
        yield worker


def _stored_or_recipe(algo: Algorithm, store: Any, recipe: dict[str, Any]) -> dict[str, Any]:
    """The stored model of ``recipe`` when the algorithm kept it (the weights scored)."""
    if type(algo).keep_models and store_key(recipe) in store:
        return {"model": store_ref(recipe)}
    return recipe


def _split_means(
    worker: Worker, scores: dict[str, np.ndarray], spec: WorkerSpec, validation: int = 0
) -> dict[str, dict[str, float]]:
    """Task means by split, each with its ``mean``; the first ``validation`` extra tasks
    (the worker builds ``tasks.validation`` before ``tasks.test``) are the validation split."""
    means = _means(scores)
    fitness = list(worker.fitness_names)
    extra = [n for n in means if n not in fitness]
    out = {
        "fitness": {n: means[n] for n in fitness},
        "validation": {n: means[n] for n in extra[:validation]},
        "test": {n: means[n] for n in extra[validation:]},
    }
    return {
        split: {**vals, "mean": float(np.mean(list(vals.values())))}
        for split, vals in out.items()
        if vals
    }


def _finish(
    st: _Stage,
    algo: Algorithm,
    counters: dict[str, Any],
    local: Worker | None,
    spec: WorkerSpec,
    store: Any,
    reason: str,
) -> dict[str, Any]:
    folder = st.folder
    best = algo.best
    summary: dict[str, Any] = {
        "status": "completed",
        "stage": st.label,
        "algorithm": st.block.get("name"),
        "stop_reason": reason,
        "evaluations": algo.evaluations,
        "wall_seconds": float(counters["wall_seconds"]),
        "seed": st.seed,
    }
    # read back from events.jsonl, which resume keeps in step with the state; read once
    events = folder.events.read()
    seeds = {e.get("evaluation"): int(e.get("seed") or 0) for e in events}
    failures = [e["error"] for e in events if e.get("error")]
    summary["failed_candidates"] = len(failures)
    if failures:
        summary["first_failure"] = failures[0]
    if best is not None:
        with _final_worker(local, spec) as worker:
            n_val = len(st.config.tasks.validation)
            failed: dict[str, str] = {}  # what could not be built or scored now

            def scores(name: str, build: Callable[[], Any]) -> dict[str, Any] | None:
                """Means by split of the model ``build`` returns; ``None`` if building or
                scoring it fails now (a task's own exception): the search is done, and its
                summary is written all the same. A user's mistake still ends the run, and
                so does a failure to write ``best/`` (a later stage or ``--resume`` needs it),
                which happens before."""
                try:
                    s = worker.score(build(), worker.task_names(include_extra=True))
                except ShoalError:
                    raise
                except Exception as exc:
                    failed[name] = f"{type(exc).__name__}: {exc}"
                    return None
                return _split_means(worker, s, spec, n_val)

            seed = seeds.get(best.evaluation, 0)
            recipe = best.recipe
            model = worker.build(_stored_or_recipe(algo, store, recipe), seed)
            export_model(
                model, recipe, folder.best, tokenizer=worker.tokenizer, seed=seed, models=st.models
            )
            best_scores = scores("best", lambda: model)
            summary["best"] = {
                "evaluation": best.evaluation,
                "fitness": best.fitness,
                "recipe": recipe,
                "seed": seed,
                "path": str(folder.best),
                **({"scores": best_scores} if best_scores is not None else {}),
            }
            if st.config.baselines:
                summary["baselines"] = {}
                extra = st.config.baselines if isinstance(st.config.baselines, dict) else {}
                named = {name: {"model": name} for name in st.models} | extra
                for name, baseline in named.items():
                    for ref in model_refs(baseline).values():  # a model named by its path
                        if ref not in worker.sources:
                            worker.sources.add(ref, str(st.config.resolve(ref)))
                    got = scores(f"baseline {name}", partial(worker.build, baseline, 0))
                    if got is not None:
                        summary["baselines"][name] = got
            specialists = algo.specialists()
            if specialists:
                summary["specialists"] = {}
            for name, sp in specialists.items():
                sp_seed = seeds.get(sp.evaluation, 0)
                stored = _stored_or_recipe(algo, store, sp.recipe)
                got = scores(f"specialist {name}", partial(worker.build, stored, sp_seed))
                if got is not None:
                    summary["specialists"][name] = {
                        "evaluation": sp.evaluation,
                        "seed": sp_seed,
                        "scores": got,
                    }
            if failed:
                summary["failed_at_the_end"] = failed

    write_text_atomic(folder.summary, json.dumps(summary, indent=2, sort_keys=False, default=str))
    return summary


def _prepare_folder(
    folder: RunFolder, config: Any, overrides: Sequence[str], resume: bool
) -> tuple[RunConfig, dict[str, int]]:
    """The run's config (given, or saved when resuming), checked; with the task sizes."""
    if resume:
        if not folder.config.is_file():
            raise StateError(
                f"{folder.config}: nothing to resume (no config.yaml in the run folder)"
            )
        saved = load_config(folder.config)
        if config is not None or overrides:
            # the saved config wins; a different one given now would be silently
            # ignored, so it is refused instead
            # --set alone is checked against the saved config itself
            given = _given_config(folder.config if config is None else config, overrides)
            now, before = given.model_dump(mode="json"), saved.model_dump(mode="json")
            changed = sorted(k for k in now if k not in _FREE_ON_RESUME and now[k] != before.get(k))
            if changed:
                raise StateError(
                    f"{folder.config}: the run being resumed has another config "
                    f"({', '.join(changed)} differ); resume without CONFIG/--set, "
                    "or start a new --run-dir"
                )
            # what may change is taken (for this session; config.yaml keeps the run's)
            saved = saved.model_copy(update={k: getattr(given, k) for k in _FREE_ON_RESUME})
        # models or task files may have moved since
        return saved, _check(saved, str(folder.config))
    unstarted = folder.config.exists() and not folder.has_evaluations()
    if not unstarted and (folder.config.exists() or folder.state.exists()):
        raise OutputExistsError(
            f"{folder.root}: already holds a run; pass --resume to continue it "
            "or pick another --run-dir"
        )
    # a run killed before its first evaluation is no run: a fresh start replaces it
    leftovers = folder.unstarted_names() if unstarted else ()
    taken = [n for n in folder.own_names() if n not in leftovers and (folder.root / n).exists()]
    if taken:  # a run replaces best/ and report/ whole: what the user keeps there would go
        raise OutputExistsError(
            f"{folder.root}: holds {', '.join(taken)} but no run; pick another --run-dir"
        )
    if config is None:
        raise RecipeError("no config given")
    cfg = _given_config(config, overrides)
    sizes = _check(cfg, _source_name(config))  # before anything is written
    for name in leftovers:
        path = folder.root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    write_text_atomic(folder.config, cfg.to_yaml())
    return cfg, sizes


def _given_config(config: Any, overrides: Sequence[str]) -> RunConfig:
    """The config given by the caller (file, mapping or RunConfig) with ``--set`` applied."""
    if not isinstance(config, RunConfig):
        return load_config(config, overrides)
    if overrides:
        raise RecipeError("overrides apply to a config file or mapping, not a RunConfig")
    return config


def _source_name(config: Any) -> str:
    """How messages name the config: its file, as :func:`load_config` does."""
    return str(Path(config)) if isinstance(config, str | Path) else "config"


def _check(cfg: RunConfig, source: str) -> dict[str, int]:
    """:func:`check_run`, its errors prefixed with the config file (``runs.yaml: ...``)."""
    try:
        return check_run(cfg)
    except ShoalError as exc:
        raise prefix_error(exc, source) from None


@contextmanager
def _locked_run(folder: RunFolder, resume: bool) -> Iterator[None]:
    """Hold the run folder's lock; on an error before a batch is saved, undo this call.

    The lock (``.lock`` in the folder, holding the pid) is taken before anything else is
    written, so a second writer (a new run or ``--resume``) is refused in one line. Then
    the leftovers of killed writers are removed (:meth:`RunFolder.remove_leftovers`).

    On any error before a batch of the run is saved, only the run's own files this call
    created go (config, events, store, ... their temporary siblings, the lock file), and
    then the folder and the parents this call made, if left empty; a file someone else put
    there stays. The user can fix the config and run the same command again. Once a batch
    is saved, the folder is kept: it resumes.

    Raises:
        StateError: Another process holds the run folder (its pid named), or
            ``resume`` finds no folder.
        OutputExistsError: The run folder, or a parent, is a file.
    """
    root = Path(os.path.abspath(folder.root))
    blocker = next((p for p in (root, *root.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputExistsError(f"{blocker}: exists and is not a folder (--run-dir)")
    if resume and not root.is_dir():
        raise StateError(f"{folder.config}: nothing to resume (no config.yaml in the run folder)")
    made = [p for p in (root, *root.parents) if not p.exists()]  # innermost first
    before = set(root.iterdir()) if root.is_dir() else set()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with hold_lock(folder.lock, str(folder.root), error=StateError):
            try:
                folder.remove_leftovers()
                yield
            except BaseException:
                if not folder.has_state():
                    _remove_new(root, (*folder.own_names(), folder.lock.name), before, made)
                raise
    except BaseException:
        if not folder.has_state():
            _remove_new(root, (), set(), made)  # only the folders, if empty
        raise


def _remove_new(root: Path, names: tuple[str, ...], before: set[Path], made: list[Path]) -> None:
    if root.is_dir():
        for path in set(root.iterdir()) - before:
            if path.name not in names and not path.name.startswith(tuple(f".{n}." for n in names)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    for folder in made:
        try:
            folder.rmdir()  # only if empty
        except OSError:
            break


def evolve(
    config: str | Path | dict[str, Any] | RunConfig | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overrides: Sequence[str] = (),
    executor: str | None = None,
    progress: bool | None = None,
    ray_init: dict[str, Any] | None = None,
) -> RunResult:
    """Run (or resume) an evolutionary search described by a config.

    Everything that can be checked without evaluating a candidate (see
    :func:`~shoal.search.preflight.check_run`) is checked before the run folder is written,
    and an error before the first batch is saved leaves the folder as it was.

    Args:
        config: Config file, mapping or :class:`RunConfig` (ignored on resume: the run
            folder's ``config.yaml`` wins).
        run_dir: The run folder (must not hold a run unless ``resume``).
        resume: Continue the run in ``run_dir`` from its last completed batch.
        overrides: ``key.path=value`` overrides (``--set``) for a new run.
        executor: Override ``executor.type`` (does not change results).
        progress: Override ``progress`` (rich progress bar).
        ray_init: Extra ``ray.init`` arguments for a local Ray instance (tests).

    Returns:
        The :class:`RunResult` of the last stage run (``summary`` holds the run summary).

    Raises:
        ShoalError: Bad config, model, tasks or folder (RecipeError, CheckpointError,
            MergeError, TaskError, StateError, OutputExistsError), naming the config file
            and key.
    """
    if not str(run_dir).strip():  # Path("") would be the working directory
        raise RecipeError("run_dir: empty; name the run's folder (--run-dir)")
    folder = RunFolder(run_dir)
    with _locked_run(folder, resume):
        cfg, sizes = _prepare_folder(folder, config, overrides, resume)
        show = cfg.progress if progress is None else progress
        try:
            return _run_stages(folder, cfg, sizes, executor or cfg.executor.type, show, ray_init)
        except CheckpointError as exc:
            if not str(exc).startswith("models."):
                raise
            # a model of the config found broken at its first use (NaN weights, a missing
            # tensor): named like the pre-run check's errors, config file first
            source = str(folder.config) if resume else _source_name(config)
            raise prefix_error(exc, source) from None


def _run_stages(
    folder: RunFolder,
    cfg: RunConfig,
    sizes: dict[str, int],
    kind: str,
    show: bool,
    ray_init: dict[str, Any] | None,
) -> RunResult:
    models = dict(cfg.models)
    stage_results: list[RunResult] = []
    result: RunResult | None = None
    searches = {i: (name, block, budget) for i, name, block, budget in cfg.algorithm_blocks()}
    for i in range(len(cfg.stages or [None])):
        seed = (
            cfg.seed
            if cfg.stages is None
            else int(np.random.SeedSequence([cfg.seed, i]).generate_state(1)[0])
        )
        if i not in searches:  # a fixed merge step
            step = (cfg.stages or [])[i]
            result = _merge_step(folder.stage(step.name), str(step.merge), models, seed, show)
            stage_results.append(result)
            models[step.name] = os.path.abspath(result.run_dir / "best")
            continue
        name, block, budget = searches[i]
        sfolder = folder if name is None else folder.stage(name)
        done = sfolder.read_summary()
        if name is not None and done is not None and done.get("status") == "completed":
            result = RunResult(
                sfolder.root,
                "completed",
                done.get("stop_reason", ""),
                int(done.get("evaluations", 0)),
                float(done.get("wall_seconds", 0.0)),
                None,
                done,
            )
        else:
            stage = _Stage(
                cfg,
                sfolder,
                block,
                budget,
                dict(models),
                seed,
                kind,
                show,
                name or str(block["name"]),
                ray_init,
                algorithm_key(cfg, i),
                sizes,
            )
            result = _run_stage(stage)
        stage_results.append(result)
        if result.status != "completed":
            return result
        if name is not None:
            models[name] = os.path.abspath(sfolder.best)  # recipes name it from anywhere
    assert result is not None
    if cfg.stages is not None:
        result.summary = _multi_stage_summary(folder, stage_results)
    return result


def _merge_step(
    folder: RunFolder, recipe: str, models: dict[str, str], seed: int, progress: bool
) -> RunResult:
    """Run a ``merge`` stage (a recipe file, one stage or several) into ``folder/best``.

    A completed step (its ``summary.json`` says so) is not run again; one killed midway
    left no ``best/`` (merges write atomically) or one without a summary, and is redone.
    """
    from shoal.merge.multi import merge_recipe_file

    done = folder.read_summary()
    if done is None or done.get("status") != "completed":
        t0 = time.monotonic()
        merge_recipe_file(recipe, folder.best, models, seed=seed, overwrite=True, progress=progress)
        done = {
            "status": "completed",
            "stage": folder.root.name,
            "merge": recipe,
            "seed": seed,
            "evaluations": 0,
            "wall_seconds": time.monotonic() - t0,
            "best": {"path": str(folder.best)},
        }
        write_text_atomic(folder.summary, json.dumps(done, indent=2))
    return RunResult(
        folder.root, "completed", "fixed merge step", 0, float(done["wall_seconds"]), None, done
    )


def _multi_stage_summary(folder: RunFolder, results: list[RunResult]) -> dict[str, Any]:
    last = results[-1]
    best_src = last.run_dir / "best"
    if best_src.is_dir():
        tmp = temp_sibling(folder.best)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(best_src, tmp)
        replace_dir(tmp, folder.best)
    summary = {
        "status": "completed",
        "stages": [r.summary for r in results],
        "evaluations": sum(r.evaluations for r in results),
        "wall_seconds": sum(r.wall_seconds for r in results),
        "failed_candidates": sum(int(r.summary.get("failed_candidates", 0)) for r in results),
        "best": dict(last.summary.get("best", {}), path=str(folder.best)),
    }
    failed = {
        f"{r.summary.get('stage')}: {name}": error
        for r in results
        for name, error in (r.summary.get("failed_at_the_end") or {}).items()
    }
    if failed:
        summary["failed_at_the_end"] = failed
    first = next(
        (r.summary["first_failure"] for r in results if "first_failure" in r.summary), None
    )
    if first:
        summary["first_failure"] = first
    baselines: dict[str, Any] = {}
    for r in results:  # later stages also score the earlier stages' bests
        baselines.update(r.summary.get("baselines") or {})
    if baselines:
        summary["baselines"] = baselines
    # CycleQD's best elite per archive, under the stage's name when several stages have them
    with_specialists = [r.summary for r in results if r.summary.get("specialists")]
    specialists = {
        (name if len(with_specialists) == 1 else f"{s['stage']}:{name}"): row
        for s in with_specialists
        for name, row in s["specialists"].items()
    }
    if specialists:
        summary["specialists"] = specialists
    write_text_atomic(folder.summary, json.dumps(summary, indent=2, default=str))
    return summary
