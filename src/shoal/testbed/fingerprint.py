"""A short fingerprint of a testbed's weights, so a user sees whether two builds match.

The digest is SHA-256 over every model of the build in name order, and inside
each model over every tensor of ``model.safetensors`` in key order: the model's
name, the tensor's key, dtype and shape, then its bytes (little-endian, as
safetensors stores them). It reads tensors, not files, so it does not depend on
how the header happens to be laid out. The first 12 hex digits are what
``shoal testbed build`` prints and the README lists.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

__all__ = ["SHORT", "short_fingerprint", "weights_sha256"]

SHORT = 12  # hex digits printed and compared by eye


def weights_sha256(root: str | Path, models: Iterable[str]) -> str:
    """SHA-256 (hex) over the tensors of ``root/<model>/model.safetensors``."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    for name in sorted(models):
        path = Path(root) / name / "model.safetensors"
        digest.update(f"model {name}\n".encode())
        with safe_open(str(path), framework="numpy") as fh:
            for key in sorted(fh.keys()):
                array = fh.get_tensor(key)
                digest.update(f"{key} {array.dtype.str} {tuple(array.shape)}\n".encode())
                digest.update(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return digest.hexdigest()


def short_fingerprint(full: str) -> str:
    """The printed form of a fingerprint: its first :data:`SHORT` hex digits."""
    return full[:SHORT]
