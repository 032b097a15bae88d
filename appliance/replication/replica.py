"""The backup side of a SQLite stream: apply whole transactions to a copy, atomically.

Contract:

- The replica file is, at every instant a reader can look (under
  :meth:`Replica.locked`), equal to one committed state of the source. Each
  batch is written first to one of two journals (ping-pong, with a sequence
  number and a CRC), fsynced, and only then into the database file; after a
  crash the newest valid journal is redone (idempotent), a torn one is
  ignored (the database was not touched yet). A full seed is written to a
  separate file and renamed into place, announced in the journal first.
- A batch is applied only if the checksum the database will have afterwards
  (computed from the pages before writing) equals the checksum the source
  sent: a wrong, reordered or corrupted batch is refused, never applied.
- The position (WAL generation + frame) lives in the journals, so it is
  exactly as durable as the pages it describes.
- One process applies at a time: an exclusive ``flock`` on ``<replica>.hotsite/lock``.
- Verified at rest: the hash of every page of the last verified state is
  recorded beside the file (``record.py``). At open the file is read and
  compared with that record before anything is shown or promoted; a
  difference (a row edited, bytes flipped, an older copy, a missing file,
  writes in a ``-wal``) is :attr:`Replica.damage`, shown in status and
  refused by promotion. ``hashes`` always describe the file as it is, so
  the next session's resync asks the source for exactly the pages that
  differ; the first verified batch after it clears the damage.
- After :meth:`promote` nothing is applied until :meth:`demote`, which holds
  SQLite's write lock while it proves the file still has exactly the
  promoted checksum (else refuses unless told to discard the backup's
  writes). Writes made at the backup after that are found before the next
  batch (file stamp, ``-wal``) and stop apply instead of being overwritten.
- A failing disk (full, I/O error) raises :class:`ReplicaStorageError`; the
  next session first redoes the newest journal, so nothing half-applied stays.

All methods block (file I/O, fsync): call them from a worker thread.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import functools
import json
import os
import shutil
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from appliance.errors import HotsiteError
from appliance.replication.budget import JournalBudget
from appliance.replication.checksum import PageHashes, page_hash, show
from appliance.replication.position import Batch, Position
from appliance.replication.record import HashRecord

_P = ParamSpec("_P")
_R = TypeVar("_R")

MAGIC = b"HSJ1"
TRAILER = b"END!"
_HEAD = struct.Struct(">4sQI")  # magic, sequence, header length
_PAGE = struct.Struct(">I")


class ReplicaError(HotsiteError):
    """The replica cannot be opened or changed (locked by another process, damaged files)."""


class BatchRejected(HotsiteError):
    """A batch does not fit the replica (wrong position, checksum mismatch); nothing was written."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class PromotedError(HotsiteError):
    """The replica was promoted: replication into it is refused until an operator decides."""


class ReplicaStorageError(HotsiteError):
    """The replica's disk refused a read or write (full, read-only, I/O error): nothing was lost,
    the next attempt redoes the newest journal first."""

    def __init__(self, message: str, *, disk_full: bool) -> None:
        super().__init__(message)
        self.disk_full = disk_full


def _no_room(replica: Replica) -> bool:
    """SQLite reports a full disk as "disk I/O error" when its -wal or -shm cannot grow: ask the disk."""
    try:
        return shutil.disk_usage(replica.path.parent).free < NO_ROOM_BYTES
    except OSError:
        return False


NO_ROOM_BYTES = 256 * 1024  # less free than this on the replica's filesystem: a failed write is "disk full"


def _storage(what: str) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Turn a local I/O failure inside a replica method into :class:`ReplicaStorageError`.

    Why: the stream client must tell its own disk failing (log at ERROR,
    raise a full disk, retry) from the link failing (INFO, reconnect); both
    arrive as ``OSError``. The replica is marked for recovery, because a
    failure half-way through writing pages leaves its memory ahead of the file.
    """

    def wrap(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(fn)
        def inner(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return fn(*args, **kwargs)
            except (OSError, sqlite3.OperationalError) as exc:
                replica = args[0]
                assert isinstance(replica, Replica)
                replica._needs_recover = True
                code = getattr(exc, "errno", None)
                full = code in (errno.ENOSPC, errno.EDQUOT) or "disk is full" in str(exc) or _no_room(replica)
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise ReplicaStorageError(
                    f"replica {replica.path}: {what} failed: {detail}"
                    + (" (the replica's filesystem is full)" if full else ""),
                    disk_full=full,
                ) from exc

        return inner

    return wrap


@dataclass(frozen=True, slots=True)
class Promotion:
    at: float
    position: Position | None
    checksum: int
    data_loss_window_s: float | None
    reason: str
    damaged: str | None = None  # what differed from the recorded state when it was promoted anyway

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "position": None if self.position is None else self.position.to_json(),
            "checksum": show(self.checksum),
            "data_loss_window_s": self.data_loss_window_s,
            "reason": self.reason,
            "damaged": self.damaged,
        }

    @classmethod
    def from_json(cls, v: dict[str, Any]) -> Promotion:
        return cls(
            at=float(v["at"]),
            position=None if v["position"] is None else Position.from_json(v["position"]),
            checksum=int(v["checksum"], 16),
            data_loss_window_s=v["data_loss_window_s"],
            reason=str(v.get("reason", "")),
            damaged=v.get("damaged"),
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Replica:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time, durable: bool = True) -> None:
        self.path = path
        self.dir = Path(str(path) + ".hotsite")
        self._clock = clock
        self._durable = durable
        self._lock_fd: int | None = None
        self._db_fd: int | None = None
        self._seed_fd: int | None = None
        self._seed_hashes: PageHashes | None = None
        self._seed_meta: dict[str, Any] = {}
        self._seed_path: Path | None = None  # the seed being written: seed-<its journal's seq>.tmp
        self._stage: _Stage | None = None  # a batch too large for one message, being received
        self.staged_batches = 0
        self.rewrites = 0  # staged batches applied by building a new file (tests, the benchmark)
        # Seconds spent per stage of staged batches (the benchmark's breakdown): staging chunks as
        # they arrive, committing (of which: writing pages into the file and its fsync, or completing a
        # new file and its fsync).
        self.timings: dict[str, float] = dict.fromkeys(
            ("stage", "commit", "write", "fsync", "new_file", "record", "journal", "rename"), 0.0
        )
        # perf_counter at the last staged batch's begin / end / commit
        self.stage_marks: dict[str, float] = {}
        self.budget = JournalBudget()  # disk a journal may take (set from the stream's config)
        self._mutex = threading.Lock()
        self.hashes = PageHashes()
        self.position: Position | None = None
        self.page_size = 0
        self.seq = 0
        self.observed_at: float | None = None  # source time at which our state was the newest
        self.applied_at: float | None = None
        self.promotion: Promotion | None = None
        self.batches_applied = 0
        self.needs_resync = False  # set after a refused batch or a demotion: compare hashes on reconnect
        self._record = HashRecord(self.dir, durable=durable)
        self.damage: str | None = None  # how the file differs from the recorded verified state
        self.recorded_checksum: int | None = None  # checksum of the recorded verified state
        self.verified_at: float | None = None  # when the file was last read and compared with the record
        self._stamp: tuple[int, int, int] | None = None  # (inode, size, mtime) after our own last write
        self._needs_recover = False  # a write failed half-way: redo the newest journal before going on

    # -- open / recover --------------------------------------------------

    def open(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReplicaError(f"replica directory {self.dir} cannot be created: {exc.strerror}") from None
        if self._lock_fd is None:  # a retry after a failed recovery keeps the lock it took
            fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ReplicaError(f"replica {self.path} is being applied by another process") from None
            self._lock_fd = fd
        self.ensure_recovered(force=True)

    def ensure_recovered(self, force: bool = False) -> None:
        """Redo the newest journal and verify the file at rest, if a write failed (or ``force``)."""
        with self._mutex:
            if not (force or self._needs_recover):
                return
            self._needs_recover = True
            self._abort_stage()
            self.seed_abort()
            self._recover_checked()
            self._needs_recover = False

    @_storage("recovery (redo of the newest journal, verification at rest)")
    def _recover_checked(self) -> None:
        self._recover()

    def close(self) -> None:
        self.stage_abort()
        for name in ("_seed_fd", "_db_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def _journal_path(self, seq: int) -> Path:
        return self.dir / f"journal-{seq % 2}"

    def _read_journal(self, path: Path) -> tuple[int, dict[str, Any], Iterator[tuple[int, bytes]]] | None:
        """(sequence, header, its pages read lazily) of a complete journal; None if absent or torn.

        The CRC is checked by reading the file in bounded pieces, and the
        pages are read back the same way: a journal as large as the database
        (a resnapshot) is never held in memory.
        """
        scanned = _scan_journal(path)
        if scanned is None:
            return None
        seq, header, start, end = scanned
        return seq, header, _journal_pages(path, start, end, int(header.get("page_size") or 0))

    def _recover(self) -> None:
        found = [j for j in (self._read_journal(self.dir / f"journal-{i}") for i in (0, 1)) if j is not None]
        missing = not self.path.exists()
        self.damage, self.recorded_checksum = None, None
        if not found:
            self._discard_seeds()
            self._discard_rewrites()
            self._record.discard_leftovers()
            self.position, self.page_size, self.promotion = None, 0, None
            self._open_db(load=False)
            self.hashes = PageHashes()
            self._stamp_file()
            return
        seq, header, pages = max(found, key=lambda j: j[0])
        self.seq = seq
        kind = header["kind"]
        if kind == "seed":
            # Only the file this journal's seed wrote is put in place (if the crash came before its
            # rename); a later seed that never got its journal leaves a file that is no state.
            seed = self._seed_file(seq)
            if seed.exists():
                os.replace(seed, self.path)
                missing = False
                if self._durable:
                    _fsync_dir(self.path.parent)
            self._record.commit_staged(seq)
        self._discard_seeds()
        rewritten = kind in ("tx", "resync") and bool(header.get("file"))
        if rewritten:
            missing = self._complete_rewrite(seq, str(header["file"])) and missing
        self._discard_rewrites()
        self._record.discard_leftovers()
        self._load_header(header)
        self._open_db(load=False)
        recorded = self._record.load()
        done = recorded is not None and recorded.seq == seq  # its pages and hashes were written
        if kind in ("tx", "resync") and not self.promotion and not done and not rewritten:
            # Redo (idempotent). Only when the record says the journal's pages may not all have
            # reached the file: redoing a finished one would hide damage to its pages at rest.
            changes = self._write_pages(header, pages)
            if recorded is not None and recorded.seq == seq - 1:
                self._record.update(changes, self.page_size, int(header["db_pages"]), seq)
        self._load_hashes()
        self._stamp_file()
        if self.promotion is None:
            self.damage = self._check_at_rest(header, missing)
            self.needs_resync = self.needs_resync or self.damage is not None

    def _complete_rewrite(self, seq: int, name: str) -> bool:
        """Finish journal ``seq``'s rewrite: its new file renamed over the database if that was not
        done yet, its record taken over (idempotent). False if the file was put in place now."""
        new = self.dir / name
        if name != f"rewrite-{seq}.db":
            raise ReplicaError(f"journal {seq} names {name!r} as its new file: not one this replica writes")
        if new.exists():
            os.replace(new, self.path)
            if self._durable:
                _fsync_dir(self.path.parent)
            self._record.commit_next(seq)
            return False
        self._record.commit_next(seq)
        return True

    def _seed_file(self, seq: int) -> Path:
        return self.dir / f"seed-{seq}.tmp"

    def _discard_seeds(self) -> None:
        """Seed files no journal completed (and ``seed.tmp`` of older versions, whose journal it
        belonged to cannot be told): none is a state."""
        for leftover in (*self.dir.glob("seed-*.tmp"), self.dir / "seed.tmp"):
            leftover.unlink(missing_ok=True)

    def _discard_rewrites(self) -> None:
        """New files of batches that never completed (their journal torn): the old file stands."""
        for leftover in self.dir.glob("rewrite-*.db"):
            leftover.unlink(missing_ok=True)

    def _check_at_rest(self, header: dict[str, Any], missing: bool) -> str | None:
        """Compare the file (``self.hashes``, just read) with the recorded state; None if equal.

        A record that is absent or not in step with the journals (an upgrade
        from a version without it) is rebuilt from the file only when the
        file has the checksum the newest journal states; otherwise the file
        cannot be shown as verified.
        """
        self.verified_at = self._clock()
        journal_sum = header.get("checksum") if header.get("kind") in ("tx", "seed") else None
        recorded = self._record.load()
        if recorded is not None and journal_sum is not None and recorded.checksum != int(journal_sum, 16):
            recorded = None  # not the record of this journal's state
        if (
            recorded is None
            or recorded.seq not in (self.seq - 1, self.seq)
            or (recorded.page_size != self.page_size and recorded.db_pages)
        ):
            if journal_sum is not None and int(journal_sum, 16) == self.hashes.checksum and not missing:
                self.recorded_checksum = self.hashes.checksum
                self._record.write_whole(self.hashes, self.page_size, self.seq)
                return None
            self.recorded_checksum = None if journal_sum is None else int(journal_sum, 16)
            return (
                f"replica {self.path} cannot be verified: no record of its page hashes matches its last"
                f" journal (file checksum {show(self.hashes.checksum)}); it is not known to be a state the"
                " primary committed"
            )
        self.recorded_checksum = recorded.checksum
        where = f"the state recorded at position {self.position} (checksum {show(recorded.checksum)})"
        if missing:
            return f"replica file {self.path} is missing (deleted?); expected {where}"
        pages = max(recorded.db_pages, self.hashes.db_pages)
        differ = [p for p in range(1, pages + 1) if recorded.hash_of(p) != self.hashes.hashes.get(p, 0)]
        wal = _wal_bytes(self.path)
        if not differ and not wal:
            return None
        parts = []
        if differ:
            first = ", ".join(str(p) for p in differ[:8]) + (", …" if len(differ) > 8 else "")
            size = (
                f"; the file has {self.hashes.db_pages} pages, {recorded.db_pages} recorded"
                if recorded.db_pages != self.hashes.db_pages
                else ""
            )
            parts.append(
                f"{len(differ)} of {pages} pages differ (page {first}){size}; file checksum"
                f" {show(self.hashes.checksum)}"
            )
        if wal:
            parts.append(f"{self.path}-wal holds {wal} bytes of writes not made by replication")
        return f"replica {self.path} differs from {where}: " + "; ".join(parts)

    def _stamp_file(self) -> None:
        """Remember the file as our own last write left it (see :meth:`_check_untouched`)."""
        if self._db_fd is not None:
            st = os.fstat(self._db_fd)
            self._stamp = (st.st_ino, st.st_size, st.st_mtime_ns)

    def _check_untouched(self) -> None:
        """Before writing: has anyone but us written to the file since our last write?

        Cheap when nobody did (a stat of the file and of its ``-wal``); when the
        stamp moved the file is read and compared with our hashes. Writes found
        stop apply the way a promotion does (the backup's writes are never
        overwritten by replication); ``demote --discard-local-writes`` resumes.
        """
        assert self._db_fd is not None
        st = os.fstat(self._db_fd)
        try:
            path_ino = os.stat(self.path).st_ino
        except FileNotFoundError:
            path_ino = -1
        wal = _wal_bytes(self.path)
        if not wal and path_ino == st.st_ino and self._stamp == (st.st_ino, st.st_size, st.st_mtime_ns):
            return
        if path_ino != st.st_ino:
            self._open_db(load=False)
        before = self.hashes.checksum
        self._load_hashes()
        if not wal and self.hashes.checksum == before:
            self._stamp_file()
            return
        what = f"{wal} bytes in {self.path}-wal" if wal else f"file checksum {show(self.hashes.checksum)}"
        self.damage = (
            f"replica {self.path} was written outside replication ({what}; last applied state"
            f" {show(before)} at position {self.position}); apply stopped so those writes are not overwritten"
        )
        self.promotion = Promotion(
            at=self._clock(),
            position=self.position,
            checksum=before,
            data_loss_window_s=None,
            reason="writes found at the backup while replicating",
            damaged=self.damage,
        )
        self._write_journal({"kind": "promote", **self._state_header(), "min_pages": 0}, [])
        self._record.touch(self.seq)
        raise PromotedError(
            f"{self.damage}: 'hotsite replication demote --discard-local-writes' drops them"
            " (a restore point of them is kept) and resumes"
        )

    def _load_header(self, header: dict[str, Any]) -> None:
        self.position = None if header.get("position") is None else Position.from_json(header["position"])
        self.page_size = int(header.get("page_size") or 0)
        self.observed_at = header.get("observed_at")
        self.applied_at = header.get("applied_at")
        promoted = header.get("promoted")
        self.promotion = Promotion.from_json(promoted) if promoted else None

    def _open_db(self, load: bool) -> None:
        if self._db_fd is not None:
            os.close(self._db_fd)
        self._db_fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        if load:
            self._load_hashes()

    def _load_hashes(self) -> None:
        self.hashes = PageHashes()
        if not self.page_size or self._db_fd is None:
            return
        size = os.fstat(self._db_fd).st_size
        pages = size // self.page_size
        with os.fdopen(os.dup(self._db_fd), "rb") as f:
            for pgno in range(1, pages + 1):
                self.hashes.set(pgno, f.read(self.page_size))
        self.hashes.db_pages = pages

    # -- journal ---------------------------------------------------------

    def _state_header(self) -> dict[str, Any]:
        return {
            "position": None if self.position is None else self.position.to_json(),
            "page_size": self.page_size,
            "db_pages": self.hashes.db_pages,
            "checksum": show(self.hashes.checksum),
            "observed_at": self.observed_at,
            "applied_at": self.applied_at,
            "promoted": None if self.promotion is None else self.promotion.to_json(),
        }

    def _write_journal(self, header: dict[str, Any], pages: Iterable[tuple[int, bytes]]) -> int:
        seq = self.seq + 1
        journal = _JournalWriter(self._journal_path(seq), seq, header, self._durable)
        try:
            journal.add(pages)
            journal.finish()
        finally:
            journal.close()
        self.seq = seq
        return seq

    def _write_pages(
        self,
        header: dict[str, Any],
        pages: Iterable[tuple[int, bytes]],
        hashes: Iterable[int] | None = None,
    ) -> list[tuple[int, int]]:
        """Write a journal's pages into the database file; returns their (page, hash) for the record.

        ``hashes``, if given, are the pages' hashes in the same order (a staged
        batch computed them as it arrived: a VACUUM's pages are not hashed twice).
        Runs of consecutive pages go out in one ``pwritev``: after a VACUUM that
        is nearly every page, and one system call a page cost more than the copy.
        """
        assert self._db_fd is not None
        started = time.perf_counter()
        size = int(header["page_size"])
        min_pages, db_pages = int(header["min_pages"]), int(header["db_pages"])
        if os.fstat(self._db_fd).st_size > min_pages * size:
            os.ftruncate(self._db_fd, min_pages * size)
        known = iter(hashes) if hashes is not None else None
        changes = []
        run: list[bytes] = []
        run_start = 0
        for pgno, data in pages:
            value = next(known) if known is not None else None
            if pgno > db_pages:
                continue
            if run and (pgno != run_start + len(run) or len(run) >= _IOV_MAX):
                _pwrite_all(self._db_fd, run, (run_start - 1) * size)
                run = []
            if not run:
                run_start = pgno
            run.append(data)
            changes.append((pgno, page_hash(pgno, data) if value is None else value))
        if run:
            _pwrite_all(self._db_fd, run, (run_start - 1) * size)
        os.ftruncate(self._db_fd, db_pages * size)
        t0 = time.perf_counter()
        self.timings["write"] += t0 - started
        if self._durable:
            os.fsync(self._db_fd)
        self.timings["fsync"] += time.perf_counter() - t0
        return changes

    # -- apply -----------------------------------------------------------

    def _check_writable(self) -> None:
        if self.promotion is not None:
            raise PromotedError(
                f"replica {self.path} was promoted at {time.ctime(self.promotion.at)}: replication into it"
                " stays off until 'hotsite replication demote' (see 'hotsite replication status')"
            )

    @_storage("applying a batch")
    def apply(self, batch: Batch) -> None:
        """Apply one batch atomically, or raise :class:`BatchRejected` having written nothing."""
        with self._mutex:
            self._check_writable()
            self._check_untouched()
            if batch.kind == "tx" and batch.prev != self.position:
                raise BatchRejected(
                    f"batch starts at {batch.prev}, replica is at {self.position}", reason="position"
                )
            if self.page_size and batch.page_size != self.page_size and self.hashes.db_pages:
                raise BatchRejected(
                    f"page size {batch.page_size} != replica's {self.page_size}", reason="page_size"
                )
            expected = self._preview(batch)
            if expected != batch.checksum:
                raise BatchRejected(
                    f"checksum after batch would be {show(expected)}, source says {show(batch.checksum)}",
                    reason="checksum",
                )
            now = self._clock()
            header = {
                **batch.header(),
                "applied_at": now,
                "promoted": None,
            }
            pages = sorted(batch.pages.items())
            self._check_budget(0, len(pages) * (_PAGE.size + batch.page_size))
            self._write_journal(header, pages)
            self._apply_pages(batch, header, iter(pages), now)

    def _apply_pages(
        self,
        batch: Batch,
        header: dict[str, Any],
        pages: Iterator[tuple[int, bytes]],
        now: float,
        known: Iterable[int] | None = None,
    ) -> None:
        """Write a journaled batch's pages into the database file and take on its state."""
        if self.hashes.db_pages > batch.min_pages:
            self.hashes.truncate(batch.min_pages)
        hashes = self.hashes
        changes = self._write_pages(header, pages, known)
        for pgno, value in changes:
            hashes.checksum ^= hashes.hashes.get(pgno, 0) ^ value
            hashes.hashes[pgno] = value
        self.page_size = batch.page_size
        self.hashes.truncate(batch.db_pages)
        self.hashes.db_pages = batch.db_pages
        self.position = batch.position
        self.observed_at = batch.observed_at
        self.applied_at = now
        self.batches_applied += 1
        self._record_verified(changes)

    def _record_verified(self, changes: list[tuple[int, int]]) -> None:
        """The file now holds a verified source state: record its hashes (a repair rewrites them all)."""
        if self.damage is not None or self.recorded_checksum is None:
            self._record.write_whole(self.hashes, self.page_size, self.seq)
        else:
            self._record.update(changes, self.page_size, self.hashes.db_pages, self.seq)
        self.damage = None
        self.recorded_checksum = self.hashes.checksum
        self._stamp_file()

    def _preview(self, batch: Batch) -> int:
        checksum = self.hashes.checksum
        written = {p for p in batch.pages if p <= batch.db_pages}
        cut = min(batch.min_pages, batch.db_pages)
        if cut < self.hashes.db_pages or len(self.hashes.hashes) > cut:  # a shrink: rarely
            for pgno, value in self.hashes.hashes.items():
                if pgno > cut and pgno not in written:
                    checksum ^= value
        for pgno in written:
            old = self.hashes.hashes.get(pgno, 0)
            checksum ^= old ^ page_hash(pgno, batch.pages[pgno])
        return checksum

    # -- a batch in chunks (staged into the next journal, committed whole) ---

    @_storage("starting a staged batch")
    def stage_begin(self, header: dict[str, Any]) -> None:
        """Start receiving a batch too large for one message (``header`` as in ``Batch.header``).

        Its pages go straight into the next journal slot, which recovery
        ignores until :meth:`stage_commit` completes it: the database file is
        not touched before then, so a crash or a cut link mid-transfer leaves
        the replica at its previous state, and the next session starts again.
        The checksum the database would have is accumulated page by page.
        """
        self.stage_marks = {"begin": time.perf_counter()}
        with self._mutex:
            self._check_writable()
            self._check_untouched()
            self._abort_stage()
            batch = Batch.from_header({**header, "checksum": "0"}, {})
            if batch.kind == "tx" and batch.prev != self.position:
                raise BatchRejected(
                    f"batch starts at {batch.prev}, replica is at {self.position}", "position"
                )
            if batch.kind not in ("tx", "resync"):
                raise BatchRejected(f"a staged batch cannot be of kind {batch.kind!r}", "malformed")
            if self.page_size and batch.page_size != self.page_size and self.hashes.db_pages:
                raise BatchRejected(f"page size {batch.page_size} != replica's {self.page_size}", "page_size")
            cut = min(batch.min_pages, batch.db_pages)
            checksum = self.hashes.checksum
            for pgno, value in self.hashes.hashes.items():
                if pgno > cut:
                    checksum ^= value  # truncated away unless the batch writes it again
            seq = self.seq + 1
            record = {**batch.header(), "checksum": None, "applied_at": self._clock(), "promoted": None}
            self._stage = _Stage(
                batch, cut, checksum, seq, _JournalWriter(self._journal_path(seq), seq, record, self._durable)
            )
            self._stage.header = record
            self._stage.hint = int(header.get("page_count") or 0)

    def _rewrites(self, stage: _Stage, adding: int) -> bool:
        """Go on building a new file for this batch rather than journaling its pages (:class:`_Rewrite`)?

        Yes once it has proved large and dense: at least REWRITE_MIN_PAGES
        staged, at least half the pages in the span they cover, up to half the
        database or more announced (a VACUUM that moves what follows a hole, a
        resync after most pages changed), and a whole new file within the
        journal bound. Then every page is written once instead of twice and
        the commit is a rename. A batch of a few pages (a VACUUM that moves
        nothing) or scattered ones (a resync of a tenth) stays journaled: a
        new file would copy the whole database for them.
        """
        b = stage.batch
        staged = stage.pages + adding
        if stage.journal is None or self._db_fd is None or staged < REWRITE_MIN_PAGES:
            return False
        if 2 * stage.hint < max(self.hashes.db_pages, b.db_pages):
            return False
        if 2 * staged < stage.last_pgno - stage.first_pgno + 1:
            return False
        limit = self.budget.limit_bytes
        return not limit or b.db_pages * b.page_size <= limit

    def _switch_to_rewrite(self, stage: _Stage) -> None:
        """Move what was journaled so far into a new file, and the rest of the batch after it."""
        journal, b = stage.journal, stage.batch
        assert journal is not None and self._db_fd is not None
        name = f"rewrite-{stage.seq}.db"
        rewrite = _Rewrite(self.dir / name, self._db_fd, b.page_size, stage.cut, b.db_pages, self._durable)
        stage.rewrite, stage.header = rewrite, {**stage.header, "file": name}
        try:
            for pages in _batched(
                _journal_pages(journal.path, journal.pages_start, journal.pages_end, b.page_size)
            ):
                stage.pgnos.extend(p for p, _d in pages)
                rewrite.add(pages)
        finally:
            journal.abandon()  # torn and empty: recovery never redoes it
            stage.journal = None

    @property
    def is_open(self) -> bool:
        """Opened (its lock held) and not closed since."""
        return self._lock_fd is not None

    @property
    def staged_pages(self) -> int:
        """Pages of the batch being staged received so far (0: none is being staged)."""
        stage = self._stage
        return stage.pages if stage is not None else 0

    @property
    def staged_page_size(self) -> int:
        """Page size of the batch being staged (0: none), to parse its chunks."""
        stage = self._stage
        return stage.batch.page_size if stage is not None else 0

    @_storage("staging pages")
    def stage_pages(self, pages: list[tuple[int, bytes]]) -> int:
        """Add one chunk of pages (ascending page numbers) to the staged batch; returns how many."""
        t0 = time.perf_counter()
        try:
            return self._stage_pages(pages)
        finally:
            self.timings["stage"] += time.perf_counter() - t0

    def _stage_pages(self, pages: list[tuple[int, bytes]]) -> int:
        with self._mutex:
            stage = self._stage
            if stage is None:
                raise BatchRejected("pages arrived for no staged batch", "malformed")
            b, n = stage.batch, 0
            for pgno, data in pages:
                if pgno <= stage.last_pgno or len(data) != b.page_size:
                    self._abort_stage()
                    raise BatchRejected(
                        f"staged page {pgno} ({len(data)} bytes) after page {stage.last_pgno}:"
                        f" expected ascending pages of {b.page_size} bytes",
                        "malformed",
                    )
                stage.last_pgno = pgno
                stage.first_pgno = stage.first_pgno or pgno
                value = 0
                if pgno <= b.db_pages:
                    before = 0 if pgno > stage.cut else self.hashes.hashes.get(pgno, 0)
                    value = page_hash(pgno, data)
                    stage.checksum ^= before ^ value
                stage.hashes.append(value)
                n += 1
            if stage.rewrite is not None:
                return self._stage_rewrite(stage, pages, n)
            if self._rewrites(stage, n):
                self._switch_to_rewrite(stage)
                return self._stage_rewrite(stage, pages, n)
            try:
                self._check_budget(stage.pages * (_PAGE.size + b.page_size), n * (_PAGE.size + b.page_size))
            except BatchRejected:
                self._abort_stage()
                raise
            stage.pages += n
            assert stage.journal is not None
            stage.journal.add(pages)
            return n

    @_storage("committing a staged batch")
    def stage_commit(self, checksum: int, observed_at: float | None = None) -> Batch:
        """Commit the staged batch if the database would then have ``checksum``; else refuse it.

        Returns the batch's description (no pages) for the caller's counters.
        """
        t0 = self.stage_marks["end"] = time.perf_counter()
        try:
            return self._stage_commit(checksum, observed_at)
        finally:
            self.stage_marks["committed"] = time.perf_counter()
            self.timings["commit"] += self.stage_marks["committed"] - t0

    def _stage_commit(self, checksum: int, observed_at: float | None) -> Batch:
        with self._mutex:
            stage = self._stage
            if stage is None:
                raise BatchRejected("end of a staged batch that was never begun", "malformed")
            self._stage = None
            if stage.checksum != checksum:
                stage.abandon()  # torn: recovery ignores it
                raise BatchRejected(
                    f"checksum after staged batch would be {show(stage.checksum)},"
                    f" source says {show(checksum)}",
                    reason="checksum",
                )
            if stage.rewrite is not None:
                return self._commit_rewrite(stage, checksum, observed_at)
            assert stage.journal is not None
            try:
                stage.journal.finish()
            finally:
                stage.journal.close()
            self.seq = stage.seq
            batch = stage.batch
            batch.checksum = checksum
            if observed_at is not None:
                batch.observed_at = observed_at
            batch.page_count = stage.pages
            # Read back what we just wrote and fsynced, in bounded pieces (its CRC is for recovery:
            # checking it here read the whole journal once more), with the hashes computed on arrival.
            journal = stage.journal
            pages = _journal_pages(journal.path, journal.pages_start, journal.pages_end, batch.page_size)
            self._apply_pages(batch, journal.header, pages, self._clock(), stage.hashes)
            self.staged_batches += 1
            return batch

    @staticmethod
    def _stage_rewrite(stage: _Stage, pages: list[tuple[int, bytes]], n: int) -> int:
        assert stage.rewrite is not None
        stage.pgnos.extend(p for p, _d in pages)
        stage.pages += n
        stage.rewrite.add(pages)
        return n

    def _commit_rewrite(self, stage: _Stage, checksum: int, observed_at: float | None) -> Batch:
        """Put a verified rewritten file in place of the database, crash-safe at every step.

        Order: the new file complete and fsynced; its page-hash record staged
        (``pagehashes.next``, carrying this journal's sequence number); the
        journal (header only, naming the file) finished and fsynced: from
        here recovery completes the batch; the rename over the database and
        a directory fsync; the record taken over. A crash before the journal
        is complete leaves the old file and record untouched (recovery drops
        the new file); after it, recovery renames (if not yet done) and takes
        the record over: the replica is always exactly one committed state.
        """
        assert stage.rewrite is not None
        batch = stage.batch
        try:
            t0 = time.perf_counter()
            stage.rewrite.finish()
            t1 = time.perf_counter()
            self.timings["new_file"] += t1 - t0
            hashes = self._hashes_after(stage)
            if hashes.checksum != checksum:  # cannot happen: the same sums as stage.checksum
                raise ReplicaError(
                    f"rewritten file's hashes sum to {show(hashes.checksum)}, not {show(checksum)}"
                )
            self._record.stage_next(hashes, batch.page_size, stage.seq)
            t2 = time.perf_counter()
            self.timings["record"] += t2 - t1
            journal = _JournalWriter(
                self._journal_path(stage.seq),
                stage.seq,
                {**stage.header, "checksum": show(checksum), "page_count": stage.pages},
                self._durable,
            )
        except BaseException:
            stage.abandon()
            self._record.discard_leftovers()
            raise
        try:
            journal.finish()
        finally:
            journal.close()
        t3 = time.perf_counter()
        self.timings["journal"] += t3 - t2
        self.seq = stage.seq
        os.replace(stage.rewrite.path, self.path)
        if self._durable:
            _fsync_dir(self.path.parent)
        self._record.commit_next(stage.seq)
        # The old file's last reference is our descriptor: closing it frees its blocks, which for a
        # large file takes the filesystem a while. That happens in the background, off the commit.
        old, self._db_fd = self._db_fd, None
        if old is not None:
            threading.Thread(target=os.close, args=(old,), name="replica-free-old-file", daemon=True).start()
        self._open_db(load=False)
        self.timings["rename"] += time.perf_counter() - t3
        now = self._clock()
        batch.checksum = checksum
        if observed_at is not None:
            batch.observed_at = observed_at
        batch.page_count = stage.pages
        self.hashes, self.page_size, self.position = hashes, batch.page_size, batch.position
        self.observed_at, self.applied_at = batch.observed_at, now
        self.batches_applied += 1
        self.staged_batches += 1
        self.rewrites += 1
        self.damage, self.recorded_checksum = None, checksum
        self._stamp_file()
        return batch

    def _hashes_after(self, stage: _Stage) -> PageHashes:
        """The page hashes the database has once ``stage`` is applied (ours are left as they are)."""
        batch, out = stage.batch, PageHashes()
        out.hashes, out.checksum, out.db_pages = (
            dict(self.hashes.hashes),
            self.hashes.checksum,
            self.hashes.db_pages,
        )
        if out.db_pages > batch.min_pages:
            out.truncate(batch.min_pages)
        for pgno, value in zip(stage.pgnos, stage.hashes, strict=True):
            if pgno <= batch.db_pages:
                out.checksum ^= out.hashes.get(pgno, 0) ^ value
                out.hashes[pgno] = value
        out.truncate(batch.db_pages)
        out.db_pages = batch.db_pages
        return out

    def stage_abort(self) -> None:
        with self._mutex:
            self._abort_stage()

    def _abort_stage(self) -> None:
        if self._stage is not None:
            self._stage.abandon()  # left torn (and empty): never redone; a new file removed
            self._stage = None

    def _check_budget(self, journal_bytes: int, adding: int) -> None:
        """Refuse (nothing written) a journal write over the stream's configured bound."""
        refused = self.budget.refusal(journal_bytes, adding)
        if refused is not None:
            raise BatchRejected(refused, reason="journal_limit")

    # -- seed (a whole new database, replacing the file) -------------------

    @_storage("starting a seed")
    def seed_begin(self, page_size: int, db_pages: int) -> None:
        with self._mutex:
            self._check_writable()
            if self._seed_fd is not None:
                os.close(self._seed_fd)
            self._seed_path = self._seed_file(self.seq + 1)  # the journal seed_end will write
            self._seed_fd = os.open(self._seed_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
            self._seed_hashes = PageHashes()
            self._seed_hashes.db_pages = db_pages
            self._seed_meta = {"page_size": page_size, "db_pages": db_pages}

    @_storage("writing seed pages")
    def seed_pages(self, pages: Iterable[tuple[int, bytes]]) -> None:
        assert self._seed_fd is not None and self._seed_hashes is not None
        size = self._seed_meta["page_size"]
        for pgno, data in pages:
            os.pwrite(self._seed_fd, data, (pgno - 1) * size)
            self._seed_hashes.set(pgno, data)

    @_storage("completing a seed")
    def seed_end(self, position: Position, checksum: int, observed_at: float) -> None:
        with self._mutex:
            assert self._seed_fd is not None and self._seed_hashes is not None
            hashes = self._seed_hashes
            if hashes.checksum != checksum:
                self.seed_abort()
                raise BatchRejected(
                    f"seed checksum {show(hashes.checksum)} != source's {show(checksum)}", reason="checksum"
                )
            os.ftruncate(self._seed_fd, self._seed_meta["db_pages"] * self._seed_meta["page_size"])
            if self._durable:
                os.fsync(self._seed_fd)
            os.close(self._seed_fd)
            self._seed_fd = None
            now = self._clock()
            header = {
                "kind": "seed",
                "position": position.to_json(),
                "page_size": self._seed_meta["page_size"],
                "db_pages": self._seed_meta["db_pages"],
                "min_pages": self._seed_meta["db_pages"],
                "checksum": show(checksum),
                "observed_at": observed_at,
                "applied_at": now,
                "promoted": None,
            }
            seq = self.seq + 1
            seed = self._seed_file(seq)
            assert self._seed_path is not None
            if self._seed_path != seed:  # another journal came between begin and end: no one names it yet
                os.replace(self._seed_path, seed)
            self._seed_path = None
            self._record.write_whole(hashes, self._seed_meta["page_size"], seq, staged=True)
            self._write_journal(header, [])
            os.replace(seed, self.path)
            if self._durable:
                _fsync_dir(self.path.parent)
            self._record.commit_staged(seq)
            self._open_db(load=False)
            self.hashes = hashes
            self.page_size = self._seed_meta["page_size"]
            self.position = position
            self.observed_at = observed_at
            self.applied_at = now
            self._seed_hashes = None
            self.damage, self.recorded_checksum = None, checksum
            self._stamp_file()

    def seed_abort(self) -> None:
        """Drop the seed being written, if any (never the file of a seed whose journal is complete:
        recovery still has to put that one in place)."""
        if self._seed_fd is not None:
            os.close(self._seed_fd)
            self._seed_fd = None
        if self._seed_path is not None:
            self._seed_path.unlink(missing_ok=True)
            self._seed_path = None
        self._seed_hashes = None

    # -- reading -----------------------------------------------------------

    @property
    def checksum(self) -> int:
        return self.hashes.checksum

    def full_checksum(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Recompute the checksum from the file (independent of the rolling value).

        ``progress(pages done, pages in all)`` is called every 256 pages or so.
        """
        with self._mutex:
            if not self.page_size:
                return 0
            total = os.stat(self.path).st_size // self.page_size
            checksum = 0
            with open(self.path, "rb") as f:
                pgno = 0
                while data := f.read(self.page_size):
                    pgno += 1
                    checksum ^= page_hash(pgno, data)
                    if progress is not None and pgno % 256 == 0:
                        progress(pgno, total)
            if progress is not None:
                progress(pgno, total)
            return checksum

    @contextlib.contextmanager
    def locked(self) -> Iterator[Path]:
        """Hold off apply while the caller reads the file (copy it, compute over it)."""
        with self._mutex:
            yield self.path

    @property
    def verified(self) -> bool:
        """The file is a committed source state, checked against the record (snapshots, promotion)."""
        return (
            self.position is not None
            and self.damage is None
            and self.promotion is None
            and self.recorded_checksum is not None
            and self.recorded_checksum == self.hashes.checksum
        )

    def copy_verified(self, dest: Path) -> tuple[Position, int]:
        """Copy the current verified state to ``dest`` (fsynced), checking every page on the way.

        Refuses (:class:`ReplicaError`) when the state is not verified or the
        file read back does not have the recorded checksum; the caller owns
        ``dest`` (a temporary name) and removes it on failure.
        """
        with self._mutex:
            if not self.verified or self.position is None:
                raise ReplicaError(f"replica {self.path} is not a verified state now: no snapshot taken")
            expected, size = self.hashes.checksum, self.page_size
            checksum, pgno = 0, 0
            with open(self.path, "rb") as src, open(dest, "wb") as out:
                while chunk := src.read(max(size, (1 << 20) // size * size)):
                    view = memoryview(chunk)
                    for off in range(0, len(chunk), size):
                        pgno += 1
                        checksum ^= page_hash(pgno, view[off : off + size])
                    out.write(chunk)
                out.flush()
                if self._durable:
                    os.fsync(out.fileno())
            if checksum != expected:
                self.damage = (
                    f"replica {self.path} read back with checksum {show(checksum)} instead of"
                    f" {show(expected)}: changed outside replication"
                )
                self._needs_recover = True  # the next session reads the file again and resyncs it
                raise ReplicaError(
                    f"replica {self.path} read back with checksum {show(checksum)}, recorded"
                    f" {show(expected)}: changed outside replication; no snapshot taken"
                )
            return self.position, checksum

    def status(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "position": None if self.position is None else str(self.position),
            "page_size": self.page_size,
            "db_pages": self.hashes.db_pages,
            "checksum": show(self.hashes.checksum),
            "recorded_checksum": None if self.recorded_checksum is None else show(self.recorded_checksum),
            "verified_at": self.verified_at,
            "damaged": self.damage,
            "observed_at": self.observed_at,
            "applied_at": self.applied_at,
            "promoted": None if self.promotion is None else self.promotion.to_json(),
            "disk": self.budget.describe(self.dir, self.hashes.db_pages * self.page_size),
        }

    # -- promotion ---------------------------------------------------------

    @_storage("recording the promotion")
    def promote(
        self, data_loss_window_s: float | None, reason: str, force_damaged: bool = False
    ) -> Promotion:
        """Stop applying for good and record the final position; the file is then the writable copy.

        Refuses a never-seeded replica (there is nothing to hand out) and a
        damaged one unless ``force_damaged``; the promotion then records the damage.
        """
        with self._mutex:
            if self.promotion is not None:
                return self.promotion
            if self.position is None:
                raise PromotedError(
                    f"refusing to promote: replica {self.path} was never seeded, it holds nothing of the"
                    " primary's database"
                )
            if self.damage is not None and not force_damaged:
                raise PromotedError(
                    f"refusing to promote: {self.damage}. It is not a state the primary committed. Let"
                    " replication repair it (the source must be reachable), restore a snapshot"
                    " ('hotsite replication restore STREAM --at TIME -o FILE'), or promote it as it is"
                    " with --force-damaged"
                )
            self._abort_stage()
            promotion = Promotion(
                at=self._clock(),
                position=self.position,
                checksum=self.hashes.checksum,
                data_loss_window_s=data_loss_window_s,
                reason=reason,
                damaged=self.damage,
            )
            self.promotion = promotion
            self._write_journal({"kind": "promote", **self._state_header(), "min_pages": 0}, [])
            self._record.touch(self.seq)
            return promotion

    def local_changes(self) -> str | None:
        """None if the promoted copy is still exactly the promoted state; else what changed."""
        if self.promotion is None:
            return None
        wal = Path(str(self.path) + "-wal")
        current = logical_checksum(self.path)
        if current != self.promotion.checksum:
            return (
                f"checksum {show(current)} differs from {show(self.promotion.checksum)} at promotion:"
                " the backup has written to it"
            )
        if wal.exists() and wal.stat().st_size > 0:
            return f"{wal} holds uncheckpointed writes made at the backup"
        return None

    @_storage("demoting")
    def demote(
        self, discard_local_writes: bool = False, keep: Callable[[bytes], Path] | None = None
    ) -> Path | None:
        """Accept replication again after a promotion: a proof, not a heuristic.

        Under SQLite's write lock on the promoted copy (after a TRUNCATE
        checkpoint, so no writes hide in a ``-wal``), the whole file is hashed
        as SQLite reads it; only if that is exactly the promoted checksum does
        replication resume. With ``discard_local_writes`` the backup's copy is
        first handed to ``keep`` (which saves it as a named restore point and
        returns its path), then the file is resynced from the source. Writes
        made after the lock is released are found before the next batch.
        """
        with self._mutex:
            promotion = self.promotion
            if promotion is None:
                return None
            kept: Path | None = None
            with _writers_held(self.path) as conn:
                image = conn.serialize()
                page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                current = image_checksum(image, page_size) if image else 0
                if current != promotion.checksum:
                    if not discard_local_writes:
                        raise PromotedError(
                            f"refusing to resume replication into {self.path}: its checksum"
                            f" {show(current)} differs from {show(promotion.checksum)} recorded at promotion"
                            " (the backup has written to it). Copy it to the primary first (stop the"
                            " application there, copy this file over its database, start it again), or save"
                            " it and drop the backup's writes with"
                            " 'hotsite replication demote STREAM --discard-local-writes'"
                        )
                    if keep is not None:
                        kept = keep(image)
                self.promotion = None
                self._write_journal({"kind": "demote", **self._state_header(), "min_pages": 0}, [])
                self._record.touch(self.seq)
                self._open_db(load=True)
                self._stamp_file()
            recorded = self._record.load()
            clean = recorded is not None and recorded.checksum == self.hashes.checksum
            if recorded is not None and clean and not _wal_bytes(self.path):
                self.damage, self.recorded_checksum = None, recorded.checksum
            else:
                self.damage = (
                    f"replica {self.path} holds the backup's discarded writes (checksum"
                    f" {show(self.hashes.checksum)}); it is resynced from the source when it is reachable"
                )
            self.needs_resync = True
            return kept


@contextlib.contextmanager
def _writers_held(path: Path) -> Iterator[sqlite3.Connection]:
    """SQLite's write lock on ``path`` after a TRUNCATE checkpoint: nobody at the backup can commit.

    Refuses (:class:`PromotedError`) when a connection at the backup keeps
    the checkpoint from completing: its writes could still be in the ``-wal``.
    """
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    try:
        busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise PromotedError(
                f"{path} is still in use at the backup (a connection keeps its -wal from being"
                " checkpointed): stop the application's connections to it, then demote again"
            )
        conn.execute("BEGIN IMMEDIATE")
        if _wal_bytes(path):
            raise PromotedError(f"{path}-wal was written while the backup's writes were checked; try again")
        try:
            yield conn
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


def _wal_bytes(path: Path) -> int:
    try:
        return os.stat(str(path) + "-wal").st_size
    except FileNotFoundError:
        return 0


def file_checksum(path: Path, page_size: int) -> int:
    checksum = 0
    with open(path, "rb") as f:
        pgno = 0
        while data := f.read(page_size):
            pgno += 1
            checksum ^= page_hash(pgno, data)
    return checksum


def image_checksum(image: bytes, page_size: int) -> int:
    view = memoryview(image)
    checksum = 0
    for i in range(len(image) // page_size):
        checksum ^= page_hash(i + 1, view[i * page_size : (i + 1) * page_size])
    return checksum


def logical_checksum(path: Path) -> int:
    """Checksum of a SQLite database as SQLite reads it (WAL included), without writing to it."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        image = conn.serialize()
    finally:
        conn.close()
    return image_checksum(image, page_size)


class _JournalWriter:
    """One journal written as it comes: header first, pages appended, CRC and trailer last.

    Until :meth:`finish` the file has no valid trailer, so recovery treats
    it as torn and redoes the previous journal instead (idempotent).
    """

    def __init__(self, path: Path, seq: int, header: dict[str, Any], durable: bool) -> None:
        self.path = path
        self.header = header
        self._durable = durable
        self._crc = 0
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        head = json.dumps(header, sort_keys=True).encode()
        self._write(_HEAD.pack(MAGIC, seq, len(head)) + head)
        self.pages_start = self.pages_end = _HEAD.size + len(head)  # where its pages are in the file
        self._unsynced = 0

    def _write(self, data: bytes) -> None:
        assert self._fd is not None, "journal already closed"
        self._crc = zlib.crc32(data, self._crc)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def add(self, pages: Iterable[tuple[int, bytes]]) -> None:
        parts: list[bytes] = []
        for pgno, data in pages:
            parts.append(_PAGE.pack(pgno))
            parts.append(data)
        if parts:
            data = b"".join(parts)
            self._write(data)
            self.pages_end += len(data)
            self._unsynced += len(data)
            if self._durable and self._unsynced >= SYNC_EVERY_BYTES:
                # A large staged batch reaches the disk while its next chunks are still on the
                # wire: the fsync in finish(), on the commit's path, is left with little to do.
                assert self._fd is not None
                os.fdatasync(self._fd)
                self._unsynced = 0

    def finish(self) -> None:
        assert self._fd is not None, "journal already closed"
        tail = struct.pack(">I", self._crc) + TRAILER
        os.write(self._fd, tail)
        if self._durable:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def abandon(self) -> None:
        """Close an unfinished journal, emptied: still torn for recovery, and its disk given back."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
        self.close()


@dataclass(slots=True)
class _Stage:
    batch: Batch
    cut: int  # pages past this are truncated away unless the batch writes them
    checksum: int  # what the database will be, accumulated as pages arrive
    seq: int
    journal: _JournalWriter | None  # None: the batch builds a new file instead
    rewrite: _Rewrite | None = None
    header: dict[str, Any] = field(default_factory=dict)  # a rewrite's journal header (written at commit)
    last_pgno: int = 0
    first_pgno: int = 0
    hint: int = 0  # pages the source announced (at most: unchanged ones are left out)
    pages: int = 0
    # Each staged page's hash, in order (0 past the end): 8 bytes a page, reused when applying.
    hashes: array.array[int] = field(default_factory=lambda: array.array("Q"))
    pgnos: array.array[int] = field(default_factory=lambda: array.array("I"))  # a rewrite's pages, in order

    def abandon(self) -> None:
        if self.journal is not None:
            self.journal.abandon()
        if self.rewrite is not None:
            self.rewrite.abandon()


class _Rewrite:
    """A new database file built for one staged batch that rewrites most pages (a VACUUM).

    Journaling such a batch writes every page twice (journal, then file) and
    reads the journal back at commit; here each arriving page is written
    once, at its place in a new file, and the pages the batch leaves as they
    were are copied from the current file in the kernel (``copy_file_range``)
    as the chunks pass them. The current file is not touched until the new
    one is complete, fsynced and the batch's journal (no pages, naming this
    file) is complete; then the new file is renamed over it. Disk needed:
    one database's size, as for the largest journal.
    """

    def __init__(
        self, path: Path, src_fd: int, page_size: int, cut: int, db_pages: int, durable: bool
    ) -> None:
        self.path = path
        self._src = src_fd
        self._size = page_size
        self._keep = min(cut, os.fstat(src_fd).st_size // page_size)  # current pages kept unless rewritten
        self._db_pages = db_pages
        self._durable = durable
        self._filled = 0  # pages 1.._filled are in the new file (or holes, past what is kept)
        self._unsynced = 0
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)

    def add(self, pages: Iterable[tuple[int, bytes]]) -> None:
        """Write arriving pages (ascending) at their place, after the kept pages before them."""
        assert self._fd is not None
        run: list[bytes] = []
        start = 0
        for pgno, data in pages:
            if pgno > self._db_pages:
                continue
            if run and (pgno != start + len(run) or len(run) >= _IOV_MAX):
                self._write(run, start)
                run = []
            if not run:
                self._copy_kept(pgno - 1)
                start = pgno
            run.append(data)
        if run:
            self._write(run, start)

    def _write(self, run: list[bytes], start: int) -> None:
        assert self._fd is not None
        _pwrite_all(self._fd, run, (start - 1) * self._size)
        self._filled = max(self._filled, start + len(run) - 1)
        self._synced(len(run) * self._size)

    def _copy_kept(self, upto: int) -> None:
        """Pages ``_filled+1..upto`` from the current file (those it keeps; the rest stay holes)."""
        assert self._fd is not None
        last = min(upto, self._keep)
        if last > self._filled:
            offset, count = self._filled * self._size, (last - self._filled) * self._size
            _copy_range(self._src, self._fd, offset, count)
            self._synced(count)
        self._filled = max(self._filled, upto)

    def _synced(self, added: int) -> None:
        self._unsynced += added
        if self._durable and self._unsynced >= SYNC_EVERY_BYTES:
            assert self._fd is not None
            os.fdatasync(self._fd)  # reaches the disk while the next chunks are on the wire
            self._unsynced = 0

    def finish(self) -> None:
        """The kept pages after the last one written, the final size, fsynced."""
        assert self._fd is not None
        self._copy_kept(self._db_pages)
        os.ftruncate(self._fd, self._db_pages * self._size)
        if self._durable:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None

    def abandon(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)


def _batched(pages: Iterator[tuple[int, bytes]], n: int = 256) -> Iterator[list[tuple[int, bytes]]]:
    while chunk := [p for _i, p in zip(range(n), pages, strict=False)]:
        yield chunk


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes at ``offset`` from ``src`` to the same offset in ``dst``."""
    end = offset + count
    try:
        while offset < end:
            n = os.copy_file_range(src, dst, end - offset, offset, offset)
            if n <= 0:
                raise OSError(errno.EIO, f"the replica's file ended at byte {offset} while being copied")
            offset += n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        while offset < end:  # no in-kernel copy here: read and write
            data = os.pread(src, min(_READ_CHUNK, end - offset), offset)
            if not data:
                raise OSError(
                    errno.EIO, f"the replica's file ended at byte {offset} while being copied"
                ) from None
            _pwrite_all(dst, [data], offset)
            offset += len(data)


_READ_CHUNK = 1 << 20
SYNC_EVERY_BYTES = 8 * 1024 * 1024  # a journal being staged is fdatasynced every this many bytes
REWRITE_MIN_PAGES = 1024  # a staged batch of at least this many pages, half the database: a new file
_IOV_MAX = 1024  # buffers per pwritev (Linux's IOV_MAX)


def _pwrite_all(fd: int, buffers: list[bytes], offset: int) -> None:
    """Write ``buffers`` back to back at ``offset`` (one ``pwritev``, continued if short)."""
    total = sum(len(b) for b in buffers)
    done = os.pwritev(fd, buffers, offset)
    if done < total:  # rare (a signal, a nearly full disk): finish the rest plainly
        rest = b"".join(buffers)[done:]
        while rest:
            n = os.pwrite(fd, rest, offset + done)
            done += n
            rest = rest[n:]


def _scan_journal(path: Path) -> tuple[int, dict[str, Any], int, int] | None:
    """(sequence, header, first page offset, end of pages) of a complete journal, CRC checked."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < _HEAD.size + 8:
            return None
        tail = os.pread(fd, 8, size - 8)
        if tail[4:] != TRAILER:
            return None
        crc, offset = 0, 0
        while offset < size - 8:
            piece = os.pread(fd, min(_READ_CHUNK, size - 8 - offset), offset)
            if not piece:
                return None
            crc = zlib.crc32(piece, crc)
            offset += len(piece)
        if crc != struct.unpack(">I", tail[:4])[0]:
            return None
        magic, seq, hlen = _HEAD.unpack(os.pread(fd, _HEAD.size, 0))
        if magic != MAGIC:
            return None
        header = json.loads(os.pread(fd, hlen, _HEAD.size))
        return seq, header, _HEAD.size + hlen, size - 8
    finally:
        os.close(fd)


def _journal_pages(path: Path, start: int, end: int, page_size: int) -> Iterator[tuple[int, bytes]]:
    """The pages of a journal between ``start`` and ``end``, read a bounded piece at a time."""
    step = 4 + page_size
    if page_size <= 0 or start >= end:
        return
    per_read = max(1, _READ_CHUNK // step)
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        while offset < end:
            raw = f.read(min(per_read * step, end - offset))
            if not raw:
                return
            for base in range(0, len(raw) - step + 1, step):
                (pgno,) = _PAGE.unpack_from(raw, base)
                yield pgno, raw[base + 4 : base + step]
            offset += len(raw)
