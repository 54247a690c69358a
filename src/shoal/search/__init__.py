"""shoal.search — finding a recipe by evolution: the algorithms and the run machinery.

The layout is the architecture:

- ``algorithms/`` — ask/tell state machines over plain recipe dicts, one file each
  (:class:`PS`, :class:`DFS`, :class:`M2N2`, :class:`CycleQD`, the :class:`CMAES` wrapper,
  CycleQD's :class:`GridArchive`, and the :class:`Algorithm` contract in ``base.py``).
  Nothing there touches a tensor, a file or an executor.
- this folder — the run machinery that drives them: :func:`evolve` (``runner.py``: ask →
  evaluate → tell → checkpoint), :class:`RunConfig` / :func:`load_config` (``config.py``),
  :func:`check_run` (``preflight.py``: everything checked before a run folder is written),
  :class:`RunFolder` (``run_folder.py``), :func:`make_algorithm` (``context.py``), the
  progress bar (``progress.py``), :func:`export_model` (``export.py``: ``best/``) and
  :func:`open_qd_run` (``elites.py``: a CycleQD run's elites, ``shoal export``).

Imports point one way, machinery → algorithms. Names are imported lazily, so importing
one algorithm does not load the run loop and its executors.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from shoal.search import algorithms as _algorithms  # only its lazy table: cheap

# public name -> defining module: the algorithms' names through their package (which
# resolves them lazily in turn), then the run machinery's
_LAZY = {
    **dict.fromkeys(_algorithms.__all__, "shoal.search.algorithms"),
    "RunConfig": "shoal.search.config",
    "RunFolder": "shoal.search.run_folder",
    "RunResult": "shoal.search.runner",
    "check_run": "shoal.search.preflight",
    "evolve": "shoal.search.runner",
    "export_model": "shoal.search.export",
    "make_algorithm": "shoal.search.context",
    "open_qd_run": "shoal.search.elites",
    "load_config": "shoal.search.config",
}

__all__ = [
    "ALGORITHMS",
    "CMAES",
    "DFS",
    "M2N2",
    "PS",
    "Algorithm",
    "AlgorithmOptions",
    "Best",
    "CycleQD",
    "GenomeCMAES",
    "GridArchive",
    "RunConfig",
    "RunFolder",
    "RunResult",
    "SearchContext",
    "check_run",
    "evolve",
    "export_model",
    "load_config",
    "make_algorithm",
    "open_qd_run",
    "register",
    "store_key",
]

if TYPE_CHECKING:  # pragma: no cover
    from shoal.search.algorithms import (
        ALGORITHMS,
        CMAES,
        DFS,
        M2N2,
        PS,
        Algorithm,
        AlgorithmOptions,
        Best,
        CycleQD,
        GenomeCMAES,
        GridArchive,
        SearchContext,
        register,
        store_key,
    )
    from shoal.search.config import RunConfig, load_config
    from shoal.search.context import make_algorithm
    from shoal.search.elites import open_qd_run
    from shoal.search.export import export_model
    from shoal.search.preflight import check_run
    from shoal.search.run_folder import RunFolder
    from shoal.search.runner import RunResult, evolve


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shoal.search' has no attribute {name!r}")
