"""The source side of a SQLite stream: follow the WAL of a database we do not own.

Contract (Litestream's design, made exact):

- Two read-only connections take turns holding a read transaction, so
  there is always one open. A reader pins the WAL: a checkpoint cannot copy
  frames past its snapshot into the database file, and the WAL cannot be
  restarted (overwritten from the start) while it holds a non-zero read
  mark. To let the application's checkpoints progress, the hold is renewed
  every ``renew_interval_s`` (0.2 s; at once when it sits on read mark 0 or
  on an older generation) — the new transaction is begun *before* the old
  one ends, and only once every committed frame seen so far has been
  shipped. Not after every poll: a mark moving in small steps hands the
  application's auto-checkpoint a few frames to copy (and two fsyncs) after
  nearly every one of its commits (see :meth:`SqliteFollower._renew_due`). A new
  reader that gets read mark 0 (WAL fully checkpointed) blocks all
  backfill, so a restart can then only drop frames we already shipped.
  Hence, while a follower runs, a WAL restart never loses a frame; between
  sessions it may, and ``resume`` then answers "resnapshot".
- Only frames up to the wal-index's ``mxFrame`` (the last commit) are
  read; each must carry the generation's salts.
- A snapshot is the database file overlaid with the newest WAL version of
  each page up to the shipped position, read under the held transaction:
  backfill cannot pass that position, so the result is exactly the
  committed state at that frame (the online backup API gives a consistent
  copy but cannot tell at which WAL frame, which streaming needs).
- Never writes data. The only write is a checkpoint (PASSIVE, or a short
  RESTART when the WAL is large), which copies committed pages from the WAL
  into the database file and changes no data; ``checkpoint_frames = 0``
  turns even that off.
- WAL growth: under a steady write load the application's own PASSIVE
  checkpoints rarely find the WAL fully copied and unread, so the WAL never
  restarts and grows without bound (reported: at 5,000 tx/s and more it
  kept growing, and flat out the application wrote 66% slower).
  Like Litestream, once the WAL holds ``restart_frames`` frames or more and
  the follower is (nearly) at its end, it briefly takes the write lock
  (``BEGIN IMMEDIATE`` with a busy timeout of ``checkpoint_busy_ms``, so the
  application's writers wait at most that long plus the copy of the last
  few frames), reads the last frames, checkpoints (PASSIVE, now complete
  since nobody can commit) and moves its hold to a new read transaction,
  which then reads from the database file alone (read mark 0). It lets go
  of the write lock: the application's next commit restarts the WAL from
  its start (new salts: a new generation), and the follower goes on with
  that generation without a resnapshot, since it shipped every frame of
  the old one while writers were held off. Its mark-0 reader blocks any
  further checkpoint, so no second restart can pass unseen; a generation
  change that skips one anyway (salt-1 not incremented by one after a
  generation that had frames) raises :class:`ResnapshotNeeded`.
  ``restart_frames`` defaults to 1000, SQLite's default auto-checkpoint
  threshold: measured flat out, a WAL above it makes the application run a
  checkpoint attempt after every commit (one that cannot finish while we
  read), which cost it about half its throughput; many short restarts cost
  far less. Before taking the write lock the follower moves its hold up and
  copies what it can without holding anyone off, so the lock covers only the
  frames committed since.
- A transaction larger than ``MAX_FRAMES_PER_POLL`` frames is never held
  whole: it is shipped as a lazy batch (frame numbers only, pages re-read
  from the WAL while being sent in chunks).

All methods block (file I/O): call them from a worker thread.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from appliance.errors import HotsiteError
from appliance.logs import kv
from appliance.replication.checksum import PageHashes
from appliance.replication.position import Batch, Position
from appliance.replication.wal import Frame, Generation, WalFile, WalFormatError, WalHeader

log = logging.getLogger(__name__)

MAX_FRAMES_PER_POLL = 4096
# After a restart attempt that did not get the write lock (or was cut short): try again this
# much later. It was 1 s; flat out, three misses in four seconds then let the WAL grow past
# 100 MB, and the application's auto-checkpoint, which runs after every commit once the WAL
# holds 1,000 frames and cannot finish while we read, cost it half its throughput.
RESTART_RETRY_S = 0.05


class SourceError(HotsiteError):
    """The source database cannot be followed (missing, not in WAL mode, unreadable)."""


class ResnapshotNeeded(Exception):
    """The follower lost continuity with what it shipped; a new snapshot is required."""


F = TypeVar("F", bound=Callable[..., Any])


def _locked(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: SqliteFollower, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return cast(F, wrapper)


class SqliteFollower:
    def __init__(
        self,
        db_path: Path,
        clock: Callable[[], float] = time.time,
        checkpoint_frames: int = 1000,
        restart_frames: int = 1000,
        checkpoint_busy_ms: int = 50,
        renew_interval_s: float = 0.2,
    ) -> None:
        self.db_path = db_path
        self.renew_interval_s = renew_interval_s
        self._renewed_at = 0.0  # monotonic time of the last renewal of the hold
        self._hold_mark0 = True  # the hold (probably) has read mark 0: it blocks every WAL copy
        self.renewals = 0
        self.checkpoint_frames = checkpoint_frames
        self.restart_frames = restart_frames
        self.checkpoint_busy_ms = checkpoint_busy_ms
        self._rw: sqlite3.Connection | None = None
        self.checkpoints = 0
        self.restarts = 0  # WAL restarts prepared (everything shipped, backfilled, our hold on mark 0)
        self.restart_attempts = 0
        self.restart_hold_s = 0.0  # longest time one restart held the application's writers off
        self.restart_hold_total_s = 0.0  # all restarts together
        self._next_restart = 0.0  # monotonic time before which no restart is tried again (after a busy one)
        self._header: WalHeader | None = None  # the header of self.position's generation, once seen
        self._wlock: sqlite3.Connection | None = None  # takes the write lock for a restart
        self._clock = clock
        self._wal = WalFile(db_path)
        self._conns: list[sqlite3.Connection] = []
        self._holder = 0
        self._db_fd: int | None = None
        self._hold_at: tuple[Generation, int] | None = None
        self.page_size = 0
        self.hashes = PageHashes()
        self.position: Position | None = (
            None  # where reading continues (may be a new, still empty generation)
        )
        self.announced: Position | None = None  # the last position shipped: what the replica will be at
        self.frames_shipped = 0
        self.pending_frames = 0
        self.last_current_at = 0.0  # source time at which everything committed had been read
        # The agent calls us from worker threads (asyncio.to_thread), and a cancelled
        # task's thread runs on: one lock, so close() can never free a connection that
        # another thread is still stepping (that crashed the interpreter once).
        self._lock = threading.RLock()

    # -- the read hold -----------------------------------------------------

    @_locked
    def open(self) -> None:
        if not self.db_path.is_file():
            raise SourceError(f"source database {self.db_path} does not exist")
        try:
            for _ in range(2):
                conn = sqlite3.connect(
                    f"file:{self.db_path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
                )
                conn.execute("PRAGMA busy_timeout = 5000")
                self._conns.append(conn)
            mode = self._conns[0].execute("PRAGMA journal_mode").fetchone()[0]
        except sqlite3.Error as exc:
            self.close()
            raise SourceError(f"source database {self.db_path} cannot be opened: {exc}") from None
        if str(mode).lower() != "wal":
            self.close()
            raise SourceError(
                f"source database {self.db_path} is in journal_mode={mode}, not WAL: the application"
                " must open it with PRAGMA journal_mode=WAL for it to be replicated"
            )
        self._db_fd = os.open(self.db_path, os.O_RDONLY)
        self._begin(self._conns[0])
        self._note_hold()

    @_locked
    def close(self) -> None:
        for rw in (self._rw, self._wlock):
            if rw is not None:
                rw.close()
        self._rw = self._wlock = None
        for conn in self._conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._conns = []
        self._wal.close()
        if self._db_fd is not None:
            os.close(self._db_fd)
            self._db_fd = None

    @staticmethod
    def _begin(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN")
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()

    @_locked
    def renew(self) -> None:
        """Move the hold to a new read transaction; the old one ends only after the new one began.

        Records the newest commit right after the new transaction began: its
        read mark cannot be beyond it, so once everything up to there is
        shipped the hold may move on even if the writer never pauses (else
        the WAL could not be checkpointed under a steady write load).
        """
        other = 1 - self._holder
        self._begin(self._conns[other])
        self._conns[self._holder].execute("COMMIT")
        self._holder = other
        self._note_hold()
        self._renewed_at = time.monotonic()
        self.renewals += 1

    def _renew_due(self) -> bool:
        """Renew the hold at most every ``renew_interval_s``.

        Measured flat out: renewing after every poll (hundreds of times a
        second) moved our read mark in small steps, and the application's
        own auto-checkpoint, which runs after each of its commits once the
        WAL is past 1,000 frames, then found a few frames to copy almost
        every time, with two fsyncs each, in the application's commit path.
        A mark that stays put between renewals leaves it nothing to copy.
        Fewer renewals are always safe: the hold only ever gets older.

        Except a hold on read mark 0 (taken when the WAL was empty or fully
        copied, e.g. right after a restart): it blocks every copy, and each
        of the application's commits then sorts the whole WAL for a
        checkpoint that cannot proceed (seen flat out: most of the writer's
        time). Such a hold moves on as soon as the WAL has frames again.
        """
        hold = self._hold_at
        if hold is None or self._hold_mark0:
            return True
        if self.position is not None and hold[0] != self.position.generation:
            return True
        return time.monotonic() - self._renewed_at >= self.renew_interval_s

    def _note_hold(self) -> None:
        try:
            _header, mx, generation = self._wal.state()
            self._hold_at = (generation, mx)
            # Fully copied when the hold began: it most likely took read mark 0 (see _renew_due).
            self._hold_mark0 = mx == 0 or self._backfilled() >= mx
        except WalFormatError:
            self._hold_at = None  # unknown: move only once fully caught up
            self._hold_mark0 = True

    def _let_wal_restart(self, shipped: Position) -> None:
        """Under a steady write load the WAL would never restart (our hold always has a non-zero
        read mark), so it would grow without bound. When everything is shipped, run a PASSIVE
        checkpoint (it copies committed pages into the database file; it changes no data and never
        waits) and, if nothing was committed meanwhile, renew the hold: the new reader then takes
        read mark 0 and the application's next write restarts the WAL from the start. Set
        ``checkpoint_frames = 0`` for an agent that never opens the database for writing.
        """
        if self._hold_at != (shipped.generation, shipped.frame):
            return
        try:
            rw = self._rw_conn()
            rw.execute("PRAGMA busy_timeout = 0")
            rw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self.checkpoints += 1
        except sqlite3.Error as exc:
            log.debug("passive checkpoint skipped", extra=kv(error=str(exc)))
            return
        try:
            _header, mx, generation = self._wal.state()
        except WalFormatError:
            return
        if (generation, mx) == (shipped.generation, shipped.frame):
            self.renew()

    def _may_renew(self, shipped: Position, caught_up: bool) -> bool:
        hold = self._hold_at
        if caught_up:
            return True
        return hold is not None and (hold[0] != shipped.generation or shipped.frame >= hold[1])

    # -- state reading -----------------------------------------------------

    def _current(self) -> tuple[WalHeader | None, int, Generation]:
        return self._wal.state()

    def _db_header(self) -> tuple[int, int]:
        """(page size, pages) of the database file itself."""
        assert self._db_fd is not None
        raw = os.pread(self._db_fd, 100, 0)
        if len(raw) < 100 or not raw.startswith(b"SQLite format 3\x00"):
            raise SourceError(f"{self.db_path} is not a SQLite database (or is empty)")
        size = struct.unpack(">H", raw[16:18])[0]
        page_size = 65536 if size == 1 else size
        change, in_header, valid_for = (struct.unpack(">I", raw[o : o + 4])[0] for o in (24, 28, 92))
        pages = in_header if in_header and change == valid_for else os.fstat(self._db_fd).st_size // page_size
        return page_size, pages

    def _stable_current(self) -> tuple[WalHeader | None, int, Generation]:
        for _ in range(100):
            try:
                return self._current()
            except WalFormatError:
                time.sleep(0.005)
        raise SourceError(f"the WAL of {self.db_path} stayed unreadable")

    def _overlay(self) -> tuple[Position, int, int, PageHashes, Iterator[tuple[int, bytes]]]:
        """The newest committed state: (position, page size, pages, hashes filled while iterating, pages).

        Backfill cannot pass the held reader's mark, which is at most the
        newest commit read here, so the database file overlaid with the WAL
        frames up to it is exactly that committed state. The iterator must be
        consumed before the next :meth:`renew`.
        """
        header, mx, generation = self._stable_current()
        latest: dict[int, int] = {}
        if header is None or mx == 0:
            page_size, db_pages = self._db_header()
        else:
            page_size = header.page_size
            db_pages = 0
            for start in range(1, mx + 1, MAX_FRAMES_PER_POLL):
                for frame in self._wal.frames(header, start, min(mx, start + MAX_FRAMES_PER_POLL - 1)):
                    latest[frame.pgno] = frame.index
                    if frame.commit_size:
                        db_pages = frame.commit_size
        hashes = PageHashes()
        hashes.db_pages = db_pages

        def pages() -> Iterator[tuple[int, bytes]]:
            for pgno in range(1, db_pages + 1):
                # Never yield while holding the lock: the next page may be asked for from another
                # worker thread, and an RLock cannot be released by a thread that did not take it.
                with self._lock:
                    if self._db_fd is None:
                        raise SourceError("the follower was closed while pages were being read")
                    data = self._page(pgno, latest, header, page_size, hashes)
                yield pgno, data

        return Position(generation, mx), page_size, db_pages, hashes, pages()

    def _page(
        self, pgno: int, latest: dict[int, int], header: Any, page_size: int, hashes: PageHashes
    ) -> bytes:
        assert self._db_fd is not None
        index = latest.get(pgno)
        if index is not None and header is not None:
            data = self._wal.frames(header, index, index)[0].data
        else:
            data = os.pread(self._db_fd, page_size, (pgno - 1) * page_size)
            if len(data) < page_size:
                data = data + bytes(page_size - len(data))
        hashes.set(pgno, data)
        return data

    @_locked
    def read_state(self) -> tuple[Position, int, int, Iterator[tuple[int, bytes]]]:
        """Start following at the newest committed state; iterate its pages (hashes kept as they go)."""
        position, page_size, db_pages, hashes, pages = self._overlay()
        self.page_size = page_size
        self.position = self.announced = position
        self.hashes = hashes
        self.last_current_at = self._clock()
        return position, page_size, db_pages, pages

    @_locked
    def full_checksum(self) -> tuple[Position, int]:
        """Recompute the newest committed state's checksum from the files, independently of
        the rolling value; the follower's own position is untouched (see ``poll(stop_at=...)``)."""
        position, _size, _pages, hashes, pages = self._overlay()
        for _ in pages:
            pass
        return position, hashes.checksum

    @_locked
    def verify_point(self) -> tuple[Position, int]:
        """Where a verify compares, and the checksum there (see :meth:`full_checksum`).

        A WAL restarted or truncated with no frame yet is "generation G', frame
        0", a position no batch ever ends at; if the follower already moved
        there, every frame of the previous generation was shipped, so the same
        state is the last position shipped, which the replica does reach.
        """
        position, checksum = self.full_checksum()
        if position.frame == 0 and position == self.position and self.announced is not None:
            return self.announced, checksum
        return position, checksum

    # -- resume --------------------------------------------------------------

    @_locked
    def resumable(self, position: Position) -> str | None:
        """None if the WAL still holds everything after ``position``; else why not."""
        header, mx, generation = self._stable_current()
        if generation != position.generation:
            return (
                f"WAL generation changed ({position.generation.salt1:08x}{position.generation.salt2:08x}"
                f" -> {generation.salt1:08x}{generation.salt2:08x}): restarted while nobody followed it"
            )
        if position.frame > mx:
            return f"WAL has {mx} committed frames, fewer than the replica's {position.frame}"
        if position.frame and header is not None:
            info = self._wal.frame_header(header, position.frame)
            if info is None or info[1] == 0 or info[2] != header.raw_salts:
                return f"frame {position.frame} is not a commit frame of this generation"
        return None

    @_locked
    def changed_pages(self, since: Position, until: int) -> tuple[set[int], int | None, int]:
        """(pages written, smallest commit size, frames) by frames after ``since`` up to frame ``until``."""
        header, _mx, _generation = self._stable_current()
        changed: set[int] = set()
        smallest: int | None = None
        if header is None:
            return changed, smallest, 0
        for start in range(since.frame + 1, until + 1, MAX_FRAMES_PER_POLL):
            for frame in self._wal.frames(header, start, min(until, start + MAX_FRAMES_PER_POLL - 1)):
                changed.add(frame.pgno)
                if frame.commit_size:
                    smallest = frame.commit_size if smallest is None else min(smallest, frame.commit_size)
        return changed, smallest, max(0, until - since.frame)

    # -- streaming -----------------------------------------------------------

    @_locked
    def poll(self, stop_at: Position | None = None) -> Batch | None:
        """Committed transactions since the last position, merged into one batch (or None).

        Renews the read hold when everything committed has been read.
        ``stop_at`` ends the batch exactly at that frame (so a replica passes
        through a position a verify was computed at). Raises
        :class:`ResnapshotNeeded` when continuity is lost.
        """
        assert self.position is not None
        started = self._clock()
        self.pending_frames = 0
        try:
            header, mx, generation = self._current()
        except WalFormatError:
            return None  # caught a restart half-way; the next poll sees it whole
        prev = self.position
        announced = self.announced or prev
        if header is not None and header.generation == prev.generation:
            self._header = header
            if (
                self.restart_frames
                and self.checkpoint_frames
                and mx >= self.restart_frames
                and mx - prev.frame < MAX_FRAMES_PER_POLL
                and (stop_at is None or stop_at.generation != generation or stop_at.frame <= prev.frame)
                and time.monotonic() >= self._next_restart
            ):
                shipped = self._restart_wal(header, announced, started)
                if shipped is not False:
                    return shipped
        if generation != prev.generation:
            skipped = generation.salt1 != (prev.generation.salt1 + 1) & 0xFFFFFFFF
            if prev.frame and self._header is not None and skipped:
                raise ResnapshotNeeded(
                    f"the WAL went from generation {prev} to {generation.salt1:08x}{generation.salt2:08x}"
                    " without passing through the one in between"
                )
            self._header = header if header is not None and header.generation == generation else None
            if header is None or mx == 0:
                # A restart (or truncation) that has not written a frame yet: same content, new generation.
                self.position = Position(generation, 0)
                self.renew()
                return None
            if header.page_size != self.page_size:
                raise ResnapshotNeeded(f"page size changed from {self.page_size} to {header.page_size}")
            start = 1
        else:
            start = prev.frame + 1
            if mx < prev.frame:
                raise ResnapshotNeeded(f"WAL has {mx} committed frames, fewer than the {prev.frame} shipped")
        if header is None or mx < start:
            self.last_current_at = started
            if self._renew_due():
                self.renew()
            return None
        last = min(mx, start + MAX_FRAMES_PER_POLL - 1)
        if stop_at is not None and stop_at.generation == header.generation and start <= stop_at.frame < last:
            last = stop_at.frame
        try:
            frames = self._wal.frames(header, start, last)
        except WalFormatError:
            return None
        if frames and not frames[-1].commit_size and last < mx:
            # A transaction larger than one chunk: never held whole (see _ship_large).
            return self._ship_large(header, start, mx, announced, started)
        while frames and not frames[-1].commit_size:
            frames.pop()  # cannot happen (mx is a commit frame); be safe
        if not frames:
            return None
        return self._ship(frames, header.generation, announced, started, mx_after=mx)

    def _ship_large(
        self, header: WalHeader, start: int, mx: int, announced: Position, started: float
    ) -> Batch:
        """The transaction starting at frame ``start`` and larger than one chunk, as a lazy batch.

        Reads its frames a chunk at a time to hash them and note the newest
        frame of each page, keeping only frame numbers; the pages are read
        again from the WAL when sent. The hold is not renewed here: it keeps
        those frames in place until the next poll, which comes only after
        the batch was sent.
        """
        latest: dict[int, int] = {}
        min_pages = self.hashes.db_pages
        end = 0
        index = start
        while not end:
            chunk = self._wal.frames(header, index, min(mx, index + MAX_FRAMES_PER_POLL - 1))
            if not chunk:
                raise ResnapshotNeeded(f"the WAL ended at frame {index - 1} inside a committed transaction")
            for frame in chunk:
                latest[frame.pgno] = frame.index
                self.hashes.set(frame.pgno, frame.data)
                if frame.commit_size:
                    self.hashes.truncate(frame.commit_size)
                    min_pages = min(min_pages, frame.commit_size)
                    end = frame.index
                    break
            index += len(chunk)
        db_pages = self.hashes.db_pages
        refs = sorted((pgno, i) for pgno, i in latest.items() if pgno <= db_pages)
        self.position = self.announced = Position(header.generation, end)
        self.frames_shipped += end - start + 1
        self.pending_frames = mx - end
        if end == mx:
            self.last_current_at = started

        def read() -> Iterator[tuple[int, bytes]]:
            for pgno, i in refs:
                with self._lock:  # never across a yield (see _overlay)
                    data = self._wal.frames(header, i, i)[0].data
                yield pgno, data

        return Batch(
            kind="tx",
            prev=announced,
            position=self.position,
            page_size=self.page_size,
            db_pages=db_pages,
            min_pages=min_pages,
            checksum=self.hashes.checksum,
            observed_at=self.last_current_at,
            transactions=1,
            frames=end - start + 1,
            pending_frames=self.pending_frames,
            page_reader=read,
            page_count=len(refs),
        )

    def _ship(
        self,
        frames: list[Frame],
        generation: Generation,
        announced: Position,
        started: float,
        mx_after: int,
        renew: bool = True,
    ) -> Batch:
        """Take ``frames`` (whole transactions of one generation) into our state; the batch to send.

        ``mx_after`` is the newest committed frame of their generation.
        """
        pages: dict[int, bytes] = {}
        min_pages = self.hashes.db_pages
        transactions = 0
        # Hash only the last version of each page (flat out, most frames rewrite the same few
        # pages): ``unhashed`` holds versions not hashed yet; a shrinking commit drops those past
        # its end, as hashing each frame in order would have.
        unhashed: dict[int, bytes] = {}
        unhashed_max = 0
        for frame in frames:
            pages[frame.pgno] = frame.data
            unhashed[frame.pgno] = frame.data
            unhashed_max = max(unhashed_max, frame.pgno)
            if frame.commit_size:
                transactions += 1
                size = frame.commit_size
                if unhashed_max > size:
                    unhashed = {p: d for p, d in unhashed.items() if p <= size}
                    unhashed_max = max(unhashed, default=0)
                self.hashes.truncate(size)
                min_pages = min(min_pages, size)
        for pgno, data in unhashed.items():
            self.hashes.set(pgno, data)
        db_pages = self.hashes.db_pages
        end = frames[-1].index
        self.position = self.announced = Position(generation, end)
        self.frames_shipped += len(frames)
        pending = mx_after - end
        self.pending_frames = pending
        if end == mx_after:
            self.last_current_at = started
        # When the WAL is due for a restart, move the hold up and copy into the database file
        # now, without holding anyone off, so the restart itself has only a few frames left.
        restart_soon = end == mx_after and self.restart_frames and mx_after >= self.restart_frames
        if renew and (restart_soon or self._renew_due()) and self._may_renew(self.position, end == mx_after):
            self.renew()
            if end == mx_after and self.checkpoint_frames and mx_after >= self.checkpoint_frames:
                self._let_wal_restart(self.position)
        return Batch(
            kind="tx",
            prev=announced,
            position=self.position,
            page_size=self.page_size,
            db_pages=db_pages,
            min_pages=min_pages,
            checksum=self.hashes.checksum,
            observed_at=self.last_current_at,
            transactions=transactions,
            frames=len(frames),
            pending_frames=pending,
            pages={p: d for p, d in pages.items() if p <= db_pages},
        )

    # -- bounding the WAL ------------------------------------------------------

    def _rw_conn(self) -> sqlite3.Connection:
        if self._rw is None:
            self._rw = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        return self._rw

    def _restart_wal(
        self, header: WalHeader, announced: Position, started: float
    ) -> Batch | None | Literal[False]:
        """Prepare a WAL restart (see the module docstring); the batch of the last frames, or False.

        False: the write lock was not had within ``checkpoint_busy_ms`` (or
        SQLite refused), nothing changed, the caller polls as usual; the
        next try waits ``RESTART_RETRY_S``. None: nothing was left to ship.
        """
        assert self.position is not None
        self.restart_attempts += 1
        if self._wlock is None:
            self._wlock = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        wlock = self._wlock
        try:
            wlock.execute(f"PRAGMA busy_timeout = {int(self.checkpoint_busy_ms)}")
            wlock.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            log.debug("no write lock for a WAL restart", extra=kv(error=str(exc)))
            self._next_restart = time.monotonic() + RESTART_RETRY_S
            return False
        t0 = time.monotonic()
        frames: list[Frame] = []
        mx, generation = 0, header.generation
        try:
            # Nobody can commit now: read everything committed since our position (only read:
            # hashing and building the batch happen after the lock is let go).
            try:
                now_header, mx, generation = self._current()
            except WalFormatError:
                now_header, mx, generation = None, 0, header.generation
            if (
                now_header is None
                or generation != header.generation
                or mx - self.position.frame > MAX_FRAMES_PER_POLL
            ):
                self._next_restart = time.monotonic() + RESTART_RETRY_S
                return False
            if mx > self.position.frame:
                frames = self._wal.frames(now_header, self.position.frame + 1, mx)
            # Copy every frame into the database file (PASSIVE: it waits for nobody) ...
            rw = self._rw_conn()
            rw.execute("PRAGMA busy_timeout = 0")
            self._conns[self._holder].execute("COMMIT")  # our hold must not stop the copy
            try:
                rw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                self.checkpoints += 1
            finally:
                # ... then hold again: if the copy was complete, this reader reads the file alone
                # (mark 0), which blocks further copies, and the next commit restarts the WAL.
                self._begin(self._conns[self._holder])
                self._note_hold()
            if self._backfilled() >= mx:
                self.restarts += 1
                self._next_restart = 0.0
            else:  # an application reader kept the copy short: the WAL goes on; try later
                self._next_restart = time.monotonic() + RESTART_RETRY_S
        except (sqlite3.Error, WalFormatError) as exc:
            log.warning("WAL restart failed", extra=kv(error=str(exc)))
            self._next_restart = time.monotonic() + RESTART_RETRY_S
            if not frames:
                return False
        finally:
            with contextlib.suppress(sqlite3.Error):
                wlock.execute("ROLLBACK")
            held = time.monotonic() - t0
            self.restart_hold_s = max(self.restart_hold_s, held)
            self.restart_hold_total_s += held
        # Everything committed up to mx was read while nobody could commit; frames past our
        # position stay in memory, so the restart the next commit makes cannot take them.
        self.last_current_at = started
        if not frames:
            return None
        return self._ship(frames, generation, announced, started, mx_after=mx, renew=False)

    def _backfilled(self) -> int:
        """nBackfill of the wal-index: frames already copied into the database file."""
        fds = self._wal._fds()
        if fds is None:
            return 0
        raw = os.pread(fds[1], 4, 96)
        return int.from_bytes(raw, sys.byteorder) if len(raw) == 4 else 0


def describe_source(db_path: Path) -> dict[str, object]:
    """A small, read-only description for status output."""
    try:
        st = os.stat(db_path)
    except FileNotFoundError:
        return {"path": str(db_path), "exists": False}
    log.debug("described", extra=kv(path=db_path))
    return {"path": str(db_path), "exists": True, "size_bytes": st.st_size}
