"""A small MAP-Elites grid archive (the archive part of pyribs' archive / emitter / scheduler
split), used by CycleQD (METHODS.md §4).

Why not ``ribs.archives.GridArchive``: pyribs stores solutions as numeric arrays of one
``solution_dim``, while a CycleQD elite is a recipe and a model reference (strings, nested
dicts); its elite sampling is uniform only, and its state is pickled. CycleQD needs
the elites' quality and behaviour columns for its own sampling weights, and plain JSON state
for resume. So this module keeps pyribs' conventions (``add`` returns a status per
candidate, ``stats`` gives coverage and QD score, the binning rule below) in ~150 lines of
explicit state.

Binning (pyribs' ``GridArchive`` rule): on an axis with range [lo, hi] and ``b`` bins, a
value x falls in bin ⌊(x − lo) / (hi − lo) · b⌋, clipped to [0, b − 1]; so x = hi and
anything above go to the last bin, anything below lo to the first.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from shoal.errors import StateError

__all__ = ["AddStatus", "ArchiveStats", "Elite", "GridArchive"]


class AddStatus(IntEnum):
    """What :meth:`GridArchive.add` did with a candidate (pyribs' values)."""

    NOT_ADDED = 0  # its cell holds an elite at least as good
    IMPROVE = 1  # it replaced a worse elite
    NEW = 2  # its cell was empty


@dataclass(frozen=True)
class Elite:
    """One occupant of a cell.

    Attributes:
        quality: The archive's objective (higher is better).
        behaviour: The measures, one per axis.
        data: What the caller attaches (JSON-able): model reference, recipe, scores.
    """

    quality: float
    behaviour: tuple[float, ...]
    data: dict[str, Any]


@dataclass(frozen=True)
class ArchiveStats:
    """Summary of an archive (pyribs' ``ArchiveStats``).

    Attributes:
        num_elites: Occupied cells.
        coverage: ``num_elites`` / number of cells.
        qd_score: Σ over elites of (quality − ``qd_offset``).
        best_quality: Highest quality held (−inf when empty).
        mean_quality: Mean quality of the elites (nan when empty).
    """

    num_elites: int
    coverage: float
    qd_score: float
    best_quality: float
    mean_quality: float


class GridArchive:
    """A grid of ``bins`` cells per axis over ``ranges``; one elite per cell.

    Args:
        bins: Bins per axis (≥ 1).
        ranges: ``(lo, hi)`` per axis, lo < hi.
        qd_offset: Subtracted from each quality in the QD score (pyribs' threshold offset).
    """

    def __init__(
        self, bins: int, ranges: Sequence[tuple[float, float]], qd_offset: float = 0.0
    ) -> None:
        if bins < 1:
            raise ValueError(f"bins must be ≥ 1, got {bins}")
        for i, (lo, hi) in enumerate(ranges):
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"axis {i}: range [{lo}, {hi}] is empty or inverted")
        self.bins = int(bins)
        self.ranges = [(float(lo), float(hi)) for lo, hi in ranges]
        self.qd_offset = float(qd_offset)
        self._cells: dict[tuple[int, ...], Elite] = {}

    @property
    def dims(self) -> int:
        """Number of behaviour axes."""
        return len(self.ranges)

    @property
    def cells(self) -> int:
        """Number of cells, ``bins ** dims``."""
        return self.bins**self.dims

    def index_of(self, behaviour: Sequence[float]) -> tuple[int, ...]:
        """The cell of a behaviour vector (values out of range are clipped to the edge bins)."""
        if len(behaviour) != self.dims:
            raise ValueError(f"behaviour has {len(behaviour)} values, the archive {self.dims} axes")
        out = []
        for x, (lo, hi) in zip(behaviour, self.ranges, strict=True):
            x = float(x) if math.isfinite(float(x)) else lo  # NaN: the worst end
            i = math.floor((x - lo) / (hi - lo) * self.bins)
            out.append(min(max(i, 0), self.bins - 1))
        return tuple(out)

    def add_one(
        self, quality: float, behaviour: Sequence[float], data: Mapping[str, Any]
    ) -> AddStatus:
        """Insert one candidate if its cell is empty or holds a strictly worse elite."""
        q = float(quality) if math.isfinite(float(quality)) else -math.inf
        cell = self.index_of(behaviour)
        old = self._cells.get(cell)
        if old is not None and not q > old.quality:
            return AddStatus.NOT_ADDED
        self._cells[cell] = Elite(q, tuple(float(b) for b in behaviour), dict(data))
        return AddStatus.NEW if old is None else AddStatus.IMPROVE

    def add(
        self,
        qualities: Sequence[float],
        behaviours: Sequence[Sequence[float]],
        data: Sequence[Mapping[str, Any]],
    ) -> list[AddStatus]:
        """Insert candidates one after another (a later one competes with an earlier one)."""
        return [self.add_one(q, b, d) for q, b, d in zip(qualities, behaviours, data, strict=True)]

    def __len__(self) -> int:
        return len(self._cells)

    def __iter__(self) -> Iterator[tuple[tuple[int, ...], Elite]]:
        """``(cell, elite)`` in cell order (deterministic)."""
        for cell in sorted(self._cells):
            yield cell, self._cells[cell]

    def get(self, cell: Sequence[int]) -> Elite | None:
        """The elite of ``cell``, or ``None``."""
        return self._cells.get(tuple(cell))

    def stats(self) -> ArchiveStats:
        """Coverage, QD score and quality summary."""
        qs = [e.quality for e in self._cells.values()]
        return ArchiveStats(
            num_elites=len(qs),
            coverage=len(qs) / self.cells,
            qd_score=float(sum(q - self.qd_offset for q in qs)),
            best_quality=max(qs, default=-math.inf),
            mean_quality=sum(qs) / len(qs) if qs else math.nan,
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain data: grid definition and elites in cell order."""
        return {
            "bins": self.bins,
            "ranges": [list(r) for r in self.ranges],
            "qd_offset": self.qd_offset,
            "elites": [
                {
                    "cell": list(c),
                    "quality": e.quality,
                    "behaviour": list(e.behaviour),
                    "data": e.data,
                }
                for c, e in self
            ],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> GridArchive:
        """Rebuild an archive from :meth:`state_dict` (raises :class:`StateError` on a misfit)."""
        try:
            archive = cls(
                int(state["bins"]),
                [(float(lo), float(hi)) for lo, hi in state["ranges"]],
                float(state["qd_offset"]),
            )
            for e in state["elites"]:
                cell = tuple(int(i) for i in e["cell"])
                if len(cell) != archive.dims or not all(0 <= i < archive.bins for i in cell):
                    raise ValueError(f"cell {list(cell)} is outside the grid")
                archive._cells[cell] = Elite(
                    float(e["quality"]), tuple(float(b) for b in e["behaviour"]), dict(e["data"])
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"archive state does not fit: {exc}") from None
        return archive
