"""Refuse tensors holding NaN or infinity."""

from __future__ import annotations

import torch

from shoal.errors import CheckpointError


def check_finite(tensor: torch.Tensor, *, name: str, source: object) -> None:
    """Raise if a floating-point tensor holds NaN or ±inf.

    Args:
        tensor: the tensor to check (integer and bool tensors always pass).
        name: the tensor's name, for the message.
        source: the file or model it came from, for the message.

    Raises:
        CheckpointError: naming the tensor, the source and how many entries are bad.
    """
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(tensor).sum())
    n_inf = int((~finite).sum()) - n_nan
    raise CheckpointError(
        f"{source}: tensor {name!r} holds {n_nan} NaN and {n_inf} infinite values "
        f"(of {tensor.numel()})"
    )
