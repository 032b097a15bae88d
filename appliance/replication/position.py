"""Where a replica is in its source's history, and what one shipment carries."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from appliance.replication.wal import Generation


@dataclass(frozen=True, slots=True)
class Position:
    """The last committed frame shipped or applied, within one WAL generation.

    ``frame`` 0 means "the database file as it stands when the generation
    starts": every frame of the previous generation was applied.
    """

    generation: Generation
    frame: int

    def to_json(self) -> dict[str, Any]:
        return {"generation": self.generation.to_json(), "frame": self.frame}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Position:
        return cls(Generation.from_json(value["generation"]), int(value["frame"]))

    def __str__(self) -> str:
        g = self.generation
        return f"{g.salt1:08x}{g.salt2:08x}/{self.frame}"


@dataclass(slots=True)
class Batch:
    """Whole committed transactions (one or several, merged), or a resync of a whole state.

    ``kind`` is "tx" (apply on top of ``prev``), "resync" (pages that differ
    from the replica's hashes, applied on top of any state) or "seed" (the
    complete database, written to a new file). ``min_pages`` is the smallest
    database size any merged transaction had: the replica truncates to it
    first, so a shrink followed by a growth leaves what SQLite would.
    """

    kind: str
    prev: Position | None
    position: Position
    page_size: int
    db_pages: int
    min_pages: int
    checksum: int
    observed_at: float
    transactions: int = 1
    frames: int = 0
    pending_frames: int = 0
    pages: dict[int, bytes] = field(default_factory=dict)
    # A batch too large to hold (a resume, a resnapshot, a huge transaction): ``pages`` stays
    # empty and this yields them in ascending page order, read from the source's files while
    # its guard on the WAL keeps them; ``page_count`` says how many it will yield.
    page_reader: Callable[[], Iterator[tuple[int, bytes]]] | None = None
    page_count: int = 0

    @property
    def pages_total(self) -> int:
        """Pages it carries (for a lazy resnapshot batch: at most this many)."""
        return max(self.page_count, len(self.pages))

    def iter_pages(self) -> Iterator[tuple[int, bytes]]:
        """The batch's pages in ascending page order, held or read lazily."""
        if self.page_reader is not None:
            return self.page_reader()
        return iter(sorted(self.pages.items()))

    def header(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "prev": None if self.prev is None else self.prev.to_json(),
            "position": self.position.to_json(),
            "page_size": self.page_size,
            "db_pages": self.db_pages,
            "min_pages": self.min_pages,
            "checksum": f"{self.checksum:016x}",
            "observed_at": self.observed_at,
            "transactions": self.transactions,
            "frames": self.frames,
            "pending_frames": self.pending_frames,
        }

    @classmethod
    def from_header(cls, h: dict[str, Any], pages: dict[int, bytes]) -> Batch:
        return cls(
            kind=str(h["kind"]),
            prev=None if h["prev"] is None else Position.from_json(h["prev"]),
            position=Position.from_json(h["position"]),
            page_size=int(h["page_size"]),
            db_pages=int(h["db_pages"]),
            min_pages=int(h["min_pages"]),
            checksum=int(h["checksum"], 16),
            observed_at=float(h["observed_at"]),
            transactions=int(h.get("transactions", 1)),
            frames=int(h.get("frames", 0)),
            pending_frames=int(h.get("pending_frames", 0)),
            pages=pages,
        )


def merge(batches: list[Batch]) -> Batch:
    """Consecutive "tx" batches as one: the replica goes from the first's start to the last's end."""
    if len(batches) == 1:
        return batches[0]
    first, last = batches[0], batches[-1]
    pages: dict[int, bytes] = {}
    for b in batches:
        pages.update(b.pages)
    return Batch(
        kind="tx",
        prev=first.prev,
        position=last.position,
        page_size=last.page_size,
        db_pages=last.db_pages,
        min_pages=min(b.min_pages for b in batches),
        checksum=last.checksum,
        observed_at=last.observed_at,
        transactions=sum(b.transactions for b in batches),
        frames=sum(b.frames for b in batches),
        pending_frames=last.pending_frames,
        pages={p: d for p, d in pages.items() if p <= last.db_pages},
    )
