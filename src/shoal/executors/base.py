"""The executor interface: evaluate a batch of work items, results in item order."""

from __future__ import annotations

import abc
from collections.abc import Sequence

from shoal._closing import Closing
from shoal.executors.work import WorkItem, WorkResult

__all__ = ["Executor"]


class Executor(Closing, abc.ABC):
    """Evaluates batches of :class:`WorkItem`; subclasses decide where.

    ``close()`` releases workers (nothing by default); ``with`` calls it on the way out.
    """

    #: registry name
    kind: str = ""

    @abc.abstractmethod
    def evaluate(self, items: Sequence[WorkItem]) -> list[WorkResult]:
        """Build and score every item; results in the order of ``items``."""
