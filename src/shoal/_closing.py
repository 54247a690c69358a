"""A mixin for objects used as ``with obj:`` that release resources through ``close()``."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["Closing"]


class Closing:
    """``with obj as o:`` binds ``obj`` itself and calls ``obj.close()`` on the way out.

    Subclasses override :meth:`close`; the context manager never swallows an exception.
    """

    def close(self) -> None:
        """Release resources (nothing by default)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
