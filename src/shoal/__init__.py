"""shoal — build new models out of existing ones without retraining them.

The package is layered (see ``docs/architecture.md``)::

    cli → search → executors → tasks, merge → recipe, ops, checkpoint

Heavy submodules are imported lazily, so ``import shoal`` and ``shoal --help``
stay fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from shoal.errors import ShoalError

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use)
_LAZY = {
    "merge_to_disk": "shoal.merge",
    "merge_state_dicts": "shoal.merge",
    "load_recipe": "shoal.recipe",
    "load_model": "shoal.merge.layer_path",
}

__all__ = [
    "ShoalError",
    "__version__",
    "load_model",
    "load_recipe",
    "merge_state_dicts",
    "merge_to_disk",
]

if TYPE_CHECKING:  # pragma: no cover
    from shoal.merge import merge_state_dicts, merge_to_disk
    from shoal.merge.layer_path import load_model
    from shoal.recipe import load_recipe


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'shoal' has no attribute {name!r}")
