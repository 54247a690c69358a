"""The YAML loader every user file goes through (recipes, run configs, ``--set`` values).

PyYAML implements YAML 1.1, where a float needs a dot and a signed exponent: ``1e308``,
``1e-3`` and ``1.5e3`` are strings there, and a recipe with ``weight: 1e-3`` was refused
as "must be a number". YAML 1.2, JSON and Python read them as numbers, and so does
:class:`NumberLoader`. A quoted ``'1e308'`` stays a string, and :func:`safe_dump` quotes
such a string so that a file shoal writes reads back unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["NumberDumper", "NumberLoader", "safe_dump", "safe_load"]

# a decimal mantissa (digits with an optional fraction, or a bare fraction) and an
# exponent whose sign may be left out; underscores as PyYAML allows them in numbers
_EXPONENT_FLOAT = re.compile(
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$",
)


class NumberLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads exponent numbers without a dot as floats."""


# appended after PyYAML's own resolvers: a scalar they already read (an int, a YAML 1.1
# float such as 1.0e+5) keeps their reading; add_implicit_resolver copies the table
# into this class, so yaml.SafeLoader itself is unchanged
NumberLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789.")
)


class NumberDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that quotes a string :class:`NumberLoader` would read as a
    number (``'1e5'``), so that what it writes reads back unchanged."""


NumberDumper.add_implicit_resolver(
    "tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789.")
)


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` with :class:`NumberLoader`'s numbers."""
    return yaml.load(text, Loader=NumberLoader)  # a SafeLoader subclass: safe


def safe_dump(data: Any, **kwargs: Any) -> str:
    """``yaml.safe_dump`` whose output :func:`safe_load` reads back as ``data``."""
    return str(yaml.dump(data, Dumper=NumberDumper, **kwargs))
