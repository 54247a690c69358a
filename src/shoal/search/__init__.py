"""shoal.search — finding a recipe by evolution: the algorithms and the run loop.

An algorithm is an ask/tell state machine over plain recipe dicts (STYLE.md): ``ask(n)``
returns mergekit-style recipes, ``tell(recipes, scores)`` takes their per-example scores,
``state_dict()`` is plain data. Nothing in an algorithm touches a tensor; the executors
build and score what it asks for.

Algorithms (one file each, registered by name in :data:`ALGORITHMS`):

- :class:`PS` — CMA-ES over a merge recipe's weights and densities (parameter space)
- :class:`DFS` — CMA-ES over a layer path and its scales (data-flow space)
- :class:`M2N2` — model merging of natural niches (split points, competition, attraction)
- :class:`CycleQD` — quality diversity with cycling quality, over :class:`GridArchive`
- :class:`CMAES`, :class:`GenomeCMAES` — the seeded pycma wrapper under PS and DFS

The run machinery: :func:`evolve` (``runner.py``: ask → evaluate → tell → checkpoint),
:class:`RunConfig` / :func:`load_config` (``config.py``), :func:`check_run` (``preflight.py``:
everything checked before a run folder is written), :class:`RunFolder` (``run_folder.py``),
:func:`export_model` (``export.py``: ``best/``). Names are imported lazily, so importing
one algorithm does not load the run loop and its executors.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# public name -> defining module
_LAZY = {
    "ALGORITHMS": "shoal.search.base",
    "Algorithm": "shoal.search.base",
    "AlgorithmOptions": "shoal.search.base",
    "Best": "shoal.search.base",
    "CMAES": "shoal.search.cmaes",
    "CycleQD": "shoal.search.cycleqd",
    "DFS": "shoal.search.dfs",
    "GenomeCMAES": "shoal.search.cmaes",
    "GridArchive": "shoal.search.qd_archive",
    "M2N2": "shoal.search.m2n2",
    "PS": "shoal.search.ps",
    "RunConfig": "shoal.search.config",
    "RunFolder": "shoal.search.run_folder",
    "RunResult": "shoal.search.runner",
    "SearchContext": "shoal.search.base",
    "check_run": "shoal.search.preflight",
    "evolve": "shoal.search.runner",
    "export_model": "shoal.search.export",
    "load_config": "shoal.search.config",
    "register": "shoal.search.base",
    "store_key": "shoal.search.base",
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
    "register",
    "store_key",
]

if TYPE_CHECKING:  # pragma: no cover
    from shoal.search.base import (
        ALGORITHMS,
        Algorithm,
        AlgorithmOptions,
        Best,
        SearchContext,
        register,
        store_key,
    )
    from shoal.search.cmaes import CMAES, GenomeCMAES
    from shoal.search.config import RunConfig, load_config
    from shoal.search.cycleqd import CycleQD
    from shoal.search.dfs import DFS
    from shoal.search.export import export_model
    from shoal.search.m2n2 import M2N2
    from shoal.search.preflight import check_run
    from shoal.search.ps import PS
    from shoal.search.qd_archive import GridArchive
    from shoal.search.run_folder import RunFolder
    from shoal.search.runner import RunResult, evolve


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shoal.search' has no attribute {name!r}")
