"""The executor interface: evaluate a batch of work items, results in item order."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from types import TracebackType

from shoal.executors.work import WorkItem, WorkResult

__all__ = ["Executor"]


class Executor(abc.ABC):
    """Evaluates batches of :class:`WorkItem`; subclasses decide where."""

    #: registry name
    kind: str = ""

    @abc.abstractmethod
    def evaluate(self, items: Sequence[WorkItem]) -> list[WorkResult]:
        """Build and score every item; results in the order of ``items``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release workers."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
