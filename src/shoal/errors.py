"""Errors a user can cause.

Every exception here carries a message that names the file, the tensor or the
key at fault. The command line turns any :class:`ShoalError` into one line on
stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ShoalError(Exception):
    """Base class for every error caused by user input."""

    exit_code = 2


class CheckpointError(ShoalError):
    """A checkpoint is missing, unreadable, corrupt, or holds non-finite values."""


class RecipeError(ShoalError):
    """A recipe or config file is malformed: unknown key, bad type, bad value."""


class MergeError(ShoalError):
    """Source models do not fit together: missing tensor, shape mismatch."""


class OutputExistsError(ShoalError):
    """The output path exists and overwriting was not asked for."""


class StateError(ShoalError):
    """An algorithm was driven out of order, or a saved state does not fit."""


class TaskError(ShoalError):
    """A task definition or its data is invalid."""


class DeviceError(ShoalError):
    """A device name torch does not know, or a device this machine lacks."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's text, for a one-line message (library errors run to
    many lines); the exception's type when it has no text."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
