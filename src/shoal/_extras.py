"""Optional dependencies: import one, or say in one line which extra installs it.

shoal's extras (``pip install 'shoal[diffusion]'`` and so on) bring libraries that only
some commands need. A command that needs a missing one stops with a
:class:`~shoal.errors.ShoalError` naming the extra (one line, exit 2), not a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from shoal.errors import ShoalError

__all__ = ["import_extra"]


def import_extra(module: str, extra: str, needed_by: str) -> ModuleType:
    """``module``, imported, or a :class:`ShoalError` that names the extra to install.

    Args:
        module: the module to import (``"diffusers"``).
        extra: shoal's extra that installs it (``"diffusion"``).
        needed_by: what needs it, for the message (``"the diffusion testbed"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ShoalError(
            f"{needed_by} needs {module}, which is not installed: pip install 'shoal[{extra}]'"
        ) from None
