"""Parse human-written byte sizes such as ``"2GB"`` or ``"1.5GiB"``."""

from __future__ import annotations

import re

from shoal.errors import RecipeError

# decimal units follow the Hugging Face convention ("5GB" = 5 * 10**9 bytes);
# the binary ones are spelled with an "i"
_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(size: str | int) -> int:
    """Turn a size into bytes.

    Args:
        size: an int (bytes) or a string: ``"1234"``, ``"500MB"``, ``"2GB"`` (decimal,
            10**9), ``"1.5GiB"`` (binary, 2**30); case and spaces do not matter.

    Returns:
        The size in bytes, rounded down to an integer, at least 1.

    Raises:
        RecipeError: the string is not a size; the message quotes it.

    Example:
        >>> parse_size("1.5GiB")
        1610612736
    """
    if isinstance(size, bool):
        raise RecipeError(f"size {size!r}: expected a number of bytes or a string like '2GB'")
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE.match(str(size))
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS:
            raise RecipeError(
                f"size {size!r}: expected bytes or a number with a unit "
                "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '2GB'"
            )
        value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise RecipeError(f"size {size!r}: must be positive")
    return value
