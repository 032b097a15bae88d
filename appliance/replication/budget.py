"""How much disk a replica's journal may take, and whether the disk has room for it.

A batch is applied atomically: its pages are written to a journal, fsynced,
and only then into the database file (see :mod:`replica`). So a transaction
needs as much free space as the pages it changes, once: at most the size of
the database after it (a VACUUM, a resync), since pages the source sees
committed again unchanged are not sent (``SqliteFollower._unchanged``).
Chunked batches are staged into the journal as they arrive, never held in
memory, so the bound is on disk.

:class:`JournalBudget` turns that into a bound, checked before every write
to a journal, for the chunk about to be written: ``limit_bytes``
(``journal_limit_mb`` of the stream; 0: none but the database's size) caps
one journal. A transaction past it is refused before the database is
touched, named in ``last_error`` with the figure to configure; the replica
stays at its previous committed state (its position is kept: no resync
follows) and the stream retries with backoff. The half-written journal is
emptied (recovery ignores it: no trailer). A disk that fills up before the
bound is reached is the replica's storage error (see ``StorageError``).

``describe`` shows, in ``status``, the free space beside the replica and
what its largest possible transaction needs (:meth:`JournalBudget.needs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class JournalBudget:
    limit_bytes: int = 0  # one journal at most this many bytes (0: no limit but the database's size)

    def refusal(self, journal_bytes: int, adding: int) -> str | None:
        """Why ``adding`` bytes to a journal of ``journal_bytes`` is over the bound (None: it is not)."""
        total = journal_bytes + adding
        if self.limit_bytes and total > self.limit_bytes:
            return (
                f"a transaction needs a journal of more than {total / MIB:.0f} MiB, over this stream's"
                f" journal_limit_mb = {self.limit_bytes / MIB:.0f}: nothing of it was applied; raise"
                " journal_limit_mb (the largest transaction, e.g. a VACUUM, needs up to the database's size)"
            )
        return None

    def needs(self, db_bytes: int) -> int:
        """Free space a replica of ``db_bytes`` must have for its largest possible transaction."""
        return db_bytes if not self.limit_bytes else min(db_bytes, self.limit_bytes)

    def describe(self, directory: Path, db_bytes: int) -> dict[str, int | None]:
        """For ``status``: free space beside the replica and what the largest transaction needs."""
        return {
            "free_bytes": free_bytes(directory),
            "needed_bytes": self.needs(db_bytes),
            "journal_limit_bytes": self.limit_bytes or None,
        }


def free_bytes(directory: Path) -> int | None:
    """Bytes an unprivileged writer may still use on ``directory``'s filesystem (None: unknown)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def space_problems(streams: dict[str, tuple[Path, int]]) -> list[str]:
    """For ``config check``: replicas whose filesystem lacks room for their largest transaction.

    ``streams`` maps a stream's name to (replica path, journal_limit_mb). A
    replica not created yet is skipped (its size is not known).
    """
    problems = []
    for name, (path, limit_mb) in streams.items():
        try:
            size = path.stat().st_size
        except OSError:
            continue
        need = JournalBudget(limit_mb * MIB).needs(size)
        free = free_bytes(path.parent)
        if free is not None and free < need:
            problems.append(
                f"replication.streams.{name}.replica: {free / MIB:.0f} MiB free beside {str(path)!r}; its"
                f" largest transaction (a VACUUM, a resync) may need {need / MIB:.0f} MiB of journal"
                " (the database's size, or journal_limit_mb): free space or move the replica"
            )
    return problems
