"""shoal.search.algorithms — the ask/tell search algorithms, one file each.

An algorithm is a state machine over plain recipe dicts (STYLE.md): ``ask(n)`` returns
mergekit-style recipes, ``tell(recipes, scores)`` takes their per-example scores,
``state_dict()`` is plain data. Nothing here touches a tensor, a file or an executor; the
run machinery one level up (``shoal.search``: runner, run folder, preflight, config) asks,
has the executors build and score, and tells.

- ``base.py`` — the contract: :class:`Algorithm`, :class:`Best`, :class:`SearchContext`,
  the registry (:func:`register`, :data:`ALGORITHMS`) and :func:`store_key`
- ``cmaes.py`` — :class:`CMAES`, :class:`GenomeCMAES`: the seeded pycma wrapper
- ``ps.py`` — :class:`PS`: CMA-ES over a merge recipe's weights and densities
- ``dfs.py`` — :class:`DFS`: CMA-ES over a layer path and its scales
- ``m2n2.py`` — :class:`M2N2`: split-point merging, resource competition, attraction
- ``cycleqd.py`` — :class:`CycleQD`: quality diversity with cycling quality
- ``qd_archive.py`` — :class:`GridArchive`: CycleQD's MAP-Elites grid
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# public name -> defining module (lazy: importing one algorithm loads no other)
_LAZY = {
    "ALGORITHMS": "base",
    "Algorithm": "base",
    "AlgorithmOptions": "base",
    "Best": "base",
    "SearchContext": "base",
    "register": "base",
    "store_key": "base",
    "CMAES": "cmaes",
    "GenomeCMAES": "cmaes",
    "PS": "ps",
    "DFS": "dfs",
    "M2N2": "m2n2",
    "CycleQD": "cycleqd",
    "GridArchive": "qd_archive",
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
    "SearchContext",
    "register",
    "store_key",
]

if TYPE_CHECKING:  # pragma: no cover
    from shoal.search.algorithms.base import (
        ALGORITHMS,
        Algorithm,
        AlgorithmOptions,
        Best,
        SearchContext,
        register,
        store_key,
    )
    from shoal.search.algorithms.cmaes import CMAES, GenomeCMAES
    from shoal.search.algorithms.cycleqd import CycleQD
    from shoal.search.algorithms.dfs import DFS
    from shoal.search.algorithms.m2n2 import M2N2
    from shoal.search.algorithms.ps import PS
    from shoal.search.algorithms.qd_archive import GridArchive


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
