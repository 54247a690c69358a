"""Naming a torch device: a mistyped or absent device is a user error, not a traceback."""

from __future__ import annotations

import torch

from shoal.errors import DeviceError

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device | None, *, what: str = "--device") -> torch.device:
    """The torch device called ``name`` (``None`` means CPU), checked to exist here.

    Args:
        name: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, a ``torch.device`` or ``None``.
        what: How the error names the setting (an option or a config key).

    Raises:
        DeviceError: ``name`` is not a device torch knows, or this machine lacks it.
    """
    if name is None:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(
            f"{what}: {name!r} is not a torch device (cpu, cuda, cuda:1, mps)"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"{what}: {name!r}, but this torch sees no CUDA device")
        if device.index is not None and device.index >= count:
            raise DeviceError(f"{what}: {name!r}, but this machine has {count} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"{what}: {name!r}, but MPS is not available here")
    elif device.type != "cpu":
        raise DeviceError(f"{what}: {name!r}: shoal computes on cpu, cuda or mps")
    return device
