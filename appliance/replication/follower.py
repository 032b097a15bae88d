"""The source side of a SQLite stream: follow the WAL of a database we do not own.

Contract (Litestream's design, made exact, and cheaper for the writer):

- The WAL is held in place by a read-mark guard (:mod:`walguard`), not by a
  read transaction: a slot of the wal-index held at mark 0, so the
  application's checkpoints copy nothing and the WAL cannot be restarted
  (overwritten from its first frame) while we follow it. Only frames up to
  the wal-index's ``mxFrame`` (the last commit) are read, and each must
  carry the generation's salts. One idle connection stays open: its shared
  lock on the database file keeps the application's last ``close()`` from
  checkpointing past the guard and deleting the WAL.
- Letting the WAL restart, the cheap way ("windows"): once the WAL holds
  ``restart_frames`` frames (the application's own auto-checkpoint
  threshold, 1000 by default) and everything committed has been read, the
  guard's mark becomes :data:`COPY_ALL` for at most ``window_s``: the
  application's next checkpoint copies everything, as it does alone, but
  the WAL still cannot restart. The follower watches the wal-index every
  ``WINDOW_POLL_S`` and reads every commit as it appears; at an instant when
  every committed frame is both read and copied, it hands the guard over to
  read-mark 0 (:meth:`ReadMarkGuard.hand_over`): nothing more can be copied,
  so the WAL can restart only at exactly that frame, which is recorded
  (``_ended_at``). The application's next commit restarts it, or its
  TRUNCATE/RESTART checkpoint completes; if it commits first instead, the
  follower reads that commit and goes back to COPY_ALL. So the WAL is never
  restarted or truncated past a frame the follower has not read: the end of
  every generation is known exactly, never read back from the file (a
  TRUNCATE checkpoint in a window cost a resnapshot when it was). Holding
  the WAL and restarting it under the write lock (below) cost the writer
  about 40% flat out, because the application's busy handler sleeps 1, 2,
  5 ms while the checkpoint's two fsyncs hold it.
- Restarting it ourselves (when windows do not manage: the application
  checkpoints rarely, writes slowly, or the file is still short): once the
  WAL holds ``checkpoint_frames`` frames and the follower is at its end, it
  takes the write lock (``BEGIN IMMEDIATE``, busy timeout
  ``checkpoint_busy_ms``), reads the last frames, lets go of the guard,
  checkpoints (PASSIVE: complete, since nobody can commit) and holds
  read-mark 0 instead, which blocks further copies but not a restart. It
  lets go of the write lock: the application's next commit restarts the WAL,
  and the follower goes on with the new generation, having read every frame
  of the old one while writers were held off. This also makes the file long
  enough for windows (a restart at ``checkpoint_frames`` leaves it that long).
- A snapshot is the database file overlaid with the newest WAL version of
  each page up to the shipped position, read under the guard: nothing is
  copied meanwhile, so the result is exactly the committed state at that
  frame (the online backup API gives a consistent copy but cannot tell at
  which WAL frame, which streaming needs).
- Never writes data. The only writes are the guard's read mark in the
  wal-index (as any reader's) and the checkpoint above, which copies
  committed pages into the database file and changes no data;
  ``checkpoint_frames = 0`` turns it off.
- A transaction larger than ``MAX_FRAMES_PER_POLL`` frames is never held
  whole: it is shipped as a lazy batch (frame numbers only, pages re-read
  from the WAL while being sent in chunks, the guard keeping them in place).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from appliance.errors import HotsiteError
from appliance.logs import kv
from appliance.replication.checksum import PageHashes
from appliance.replication.position import Batch, Position
from appliance.replication.wal import Frame, Generation, WalFile, WalFormatError, WalHeader
from appliance.replication.walguard import COPY_ALL, GuardError, ReadMarkGuard

log = logging.getLogger(f"hotsite.{__name__}")

MAX_FRAMES_PER_POLL = 4096
WINDOW_S = 0.05  # the longest the WAL is left unguarded for the application to restart it
WINDOW_POLL_S = 0.0001  # how often the wal-index is read meanwhile
WINDOW_BACKOFF_S = 0.5  # after a window in which the application neither restarted the WAL nor wrote
WINDOW_RETRY_S = 0.005  # ... in which it wrote but did not restart it
# Windows open this fraction (1/10) before restart_frames: the application's auto-checkpoint
# then finds the WAL unguarded when it first runs, rather than failing once per commit until
# the follower catches up (cheap, but measured: a few percent of the writer's time flat out).
WINDOW_EARLY = 10
# The write lock held this long while nothing is committed: a checkpoint is waiting for us.
YIELD_AFTER_S = 0.005
# After a restart attempt that did not get the write lock (or was cut short): try again this
# much later. It was 1 s; flat out, three misses in four seconds then let the WAL grow past
# 100 MB, and the application's auto-checkpoint, which runs after every commit once the WAL
# holds 1,000 frames and cannot finish while we read, cost it half its throughput.
RESTART_RETRY_S = 0.05
# Holding nothing (when opening), how long every read-mark slot may stay busy before that is an
# error. An application's TRUNCATE checkpoint holds them all while it truncates a large WAL.
SLOT_WAIT_S = 10.0
MAX_FOLLOWED_GENERATIONS = 4096  # WAL generations remembered as followed (~100 bytes each)
CATCH_UP_ROUNDS = 1000  # polls to reach the newest commit before a catch-up gives up


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
        checkpoint_frames: int = 2000,
        restart_frames: int = 1000,
        checkpoint_busy_ms: int = 50,
        window_s: float = WINDOW_S,
    ) -> None:
        self.db_path = db_path
        self.checkpoint_frames = checkpoint_frames
        self.restart_frames = restart_frames
        self.checkpoint_busy_ms = checkpoint_busy_ms
        self.window_s = window_s
        self._keep: sqlite3.Connection | None = None  # idle; its shared lock keeps the WAL's file alive
        self._rw: sqlite3.Connection | None = None
        self._wlock: sqlite3.Connection | None = None  # takes the write lock for our own restart
        self._guard = ReadMarkGuard(Path(str(db_path) + "-shm"))
        self.checkpoints = 0
        self.restarts = 0  # WAL restarts we prepared under the write lock
        self.restart_attempts = 0
        self.restart_hold_s = 0.0  # longest time one of our restarts held the application's writers off
        self.restart_hold_total_s = 0.0  # all of them together
        self.windows = 0  # times the guard was let go for the application to restart the WAL
        self.window_restarts = 0  # ... and it did
        self.guard_waits = 0  # times the guard could not be taken back within 0.5 ms
        self.yields = 0  # polls that made way for an application checkpoint waiting for readers
        self._write_held_since: float | None = None  # monotonic time the write lock was first seen held
        self._next_restart = 0.0  # monotonic time before which no restart is tried again (after a busy one)
        self._next_window = 0.0  # monotonic time before which no window opens again (after a fruitless one)
        # Where the WAL can restart now, if anywhere: read-mark 0 is held and every frame up to it
        # was read and copied (so this is where its generation ends, exactly, if it restarts).
        self._ended_at: Position | None = None
        self._ended_by = ""  # what set _ended_at: "window", "ours" (our restart), "yield" (_make_way)
        self.slot_busy_waits = 0  # times every slot 1..4 stayed busy while read-mark 0 kept the WAL
        self._header: WalHeader | None = None  # the header of self.position's generation, once seen
        self._clock = clock
        self._wal = WalFile(db_path)
        self._db_fd: int | None = None
        self.page_size = 0
        self.hashes = PageHashes()
        self.position: Position | None = (
            None  # where reading continues (may be a new, still empty generation)
        )
        self.announced: Position | None = None  # the last position shipped: what the replica will be at
        self.frames_shipped = 0
        self.broken = False  # continuity was lost: the hashes no longer describe a state
        self._partial = False  # a whole-state read (read_state) not yet iterated to its end
        # The last frame followed in each WAL generation since the state was read: a replica at
        # any of these positions is at a state this follower passed through (see followed()).
        self._followed: dict[Generation, int] = {}
        self._deferred: _Deferred | None = None  # a large batch whose pages are hashed as sent
        self.pages_read = 0  # pages read whole from the files to hash or send a state (not frames)
        self.pages_unchanged = 0  # pages committed again exactly as they were: not sent (see _unchanged)
        self.pending_frames = 0
        self.last_current_at = 0.0  # source time at which everything committed had been read
        # The agent calls us from worker threads (asyncio.to_thread), and a cancelled
        # task's thread runs on: one lock, so close() can never free a connection that
        # another thread is still stepping (that crashed the interpreter once).
        self._lock = threading.RLock()

    # -- holding the WAL -----------------------------------------------------

    @_locked
    def open(self) -> None:
        if not self.db_path.is_file():
            raise SourceError(f"source database {self.db_path} does not exist")
        try:
            keep = sqlite3.connect(
                f"file:{self.db_path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
            self._keep = keep
            keep.execute("PRAGMA busy_timeout = 5000")
            mode = keep.execute("PRAGMA journal_mode").fetchone()[0]
            keep.execute("SELECT count(*) FROM sqlite_schema").fetchone()  # takes the shared lock, kept
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
        try:
            self._hold_restarts()
        except SourceError:
            self.close()
            raise

    @_locked
    def close(self) -> None:
        self._guard.close()
        for conn in (self._rw, self._wlock, self._keep):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        self._rw = self._wlock = self._keep = None
        self._wal.close()
        if self._db_fd is not None:
            os.close(self._db_fd)
            self._db_fd = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (nothing can be read any more)."""
        return self._db_fd is None and self._keep is None

    @property
    def hold(self) -> str:
        """What the guard blocks now: "restart" (and copies), "copy" only, or "none"."""
        return self._guard.hold

    def _hold_restarts(self, patient: bool = False) -> None:
        """Hold the WAL in place from now on (see :meth:`ReadMarkGuard.block_restart`).

        Every slot 1..4 is locked exclusively for as long as an application's
        TRUNCATE checkpoint truncates its WAL (after a VACUUM of a large
        database, that took over a second here). While read-mark 0 is held
        that is harmless (nothing can be copied, so nothing can restart past
        what was read): the follower goes on and tries again at its next
        poll. Holding nothing (only when opening), or ``patient`` (a snapshot
        needs the WAL not to restart at all), every slot contended for
        ``SLOT_WAIT_S`` is an error.
        """
        start = time.monotonic()
        lenient = self.hold == "copy" and not patient
        wait = 0.01 if lenient else SLOT_WAIT_S
        try:
            while time.monotonic() - start < wait:
                if self._guard.block_restart():
                    if time.monotonic() - start > 0.0005:
                        self.guard_waits += 1
                    return
                # Busy for an instant (a restart or a checkpoint locking every slot): try again
                # at once rather than leave the WAL unguarded for a sleep's length.
                time.sleep(0.00002)
        except GuardError as exc:
            raise SourceError(str(exc)) from None
        if lenient:
            self.slot_busy_waits += 1
            return
        raise SourceError(f"every read-mark slot of {self.db_path}-shm stayed busy for {SLOT_WAIT_S:g} s")

    def _hold_restarts_in_place(self, patient: bool = True) -> None:
        """Block restarts again (for a snapshot or a verify: ``patient``, see :meth:`_hold_restarts`);
        a generation that could not restart before was not "ended" after all (see _ended_at)."""
        self._hold_restarts(patient)
        if self._ended_at is not None and self.hold == "restart":
            with contextlib.suppress(WalFormatError):
                if self._current()[2] == self._ended_at.generation:
                    self._ended_at = None

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

        Copies cannot pass the guard's mark, which is at most the newest
        commit read here, and the WAL cannot restart, so the database file
        overlaid with the WAL frames up to it is exactly that committed state.
        The iterator must be consumed before the next :meth:`poll` (which may
        let go of the guard).
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
        self.pages_read += 1
        return data

    @_locked
    def read_state(self) -> tuple[Position, int, int, Iterator[tuple[int, bytes]]]:
        """Start following at the newest committed state; iterate its pages (hashes kept as they go)."""
        self._hold_restarts_in_place()
        self._ended_at = None
        self._deferred = None  # (hashes of a batch a session left half-sent: replaced whole here)
        position, page_size, db_pages, hashes, pages = self._overlay()
        self.page_size = page_size
        self.position = self.announced = position
        self.hashes = hashes
        self.last_current_at = self._clock()
        self._followed = {position.generation: position.frame}
        # The hashes are complete only once every page went by: a session cut half-way through a
        # seed must not leave a follower standing with half of them (see has_state).
        self._partial = True

        def complete() -> Iterator[tuple[int, bytes]]:
            yield from pages
            self._partial = False

        return position, page_size, db_pages, complete()

    @_locked
    def full_checksum(self) -> tuple[Position, int]:
        """Recompute the newest committed state's checksum from the files, independently of
        the rolling value; the follower's own position is untouched (see ``poll(stop_at=...)``)."""
        self._hold_restarts_in_place()
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

    # -- catching up from known hashes (no whole-database read) ----------------------

    @_locked
    def has_state(self) -> bool:
        """Whether the page hashes describe a position (kept by following since a full read)."""
        return self.position is not None and self.page_size > 0 and not self.broken and not self._partial

    def _note(self, position: Position) -> None:
        """Remember ``position`` as followed (the newest generations only: a bounded record)."""
        self._followed[position.generation] = position.frame
        if len(self._followed) > MAX_FOLLOWED_GENERATIONS:
            del self._followed[next(iter(self._followed))]

    @_locked
    def followed(self, position: Position) -> bool:
        """Whether ``position`` is one this follower passed (or stands at) since its state was read.

        A replica there that comes back after an outage resumes: its page hashes
        say what it lacks, and the source can account for everything since (it
        followed it), even if the WAL restarted meanwhile. Only a position it
        cannot account for is a resnapshot.
        """
        if not self.has_state():
            return False
        last = self._followed.get(position.generation)
        return last is not None and position.frame <= last

    @_locked
    def catch_up(self) -> tuple[Position, int, int]:
        """Follow to the newest commit and stop there: (position, page size, pages).

        Only WAL frames are read: the hashes move with them, as while
        streaming. The guard is left holding restarts at mark 0, so the files
        stay exactly that state until the next :meth:`poll` (new commits are
        not copied). Whole-database reads happen only to seed a follower
        without hashes (:meth:`read_state`).
        """
        for _ in range(CATCH_UP_ROUNDS):
            while self.poll() is not None:
                pass
            self._hold_restarts_in_place()
            if self.hold != "restart":
                continue
            _header, mx, generation = self._stable_current()
            assert self.position is not None
            if generation == self.position.generation and mx == self.position.frame:
                self.announced = self.position
                return self.position, self.page_size, self.hashes.db_pages
        raise SourceError(f"the WAL of {self.db_path} kept moving faster than it could be read")

    def pages_at(self, position: Position, pgnos: list[int]) -> Iterator[tuple[int, bytes]]:
        """Pages ``pgnos`` (ascending) of the state at ``position``, as :meth:`catch_up` left it.

        Each page read is checked against the hash kept for it: a kept hash
        that does not match the files is a bug or a change behind SQLite's
        back, and the batch must not be sent as if it described this state.
        """
        with self._lock:
            latest = self._latest_frames(position)
            header = self._header
        scratch = PageHashes()
        for pgno in pgnos:
            with self._lock:  # never across a yield (see _overlay)
                if self._db_fd is None or self.position != position:
                    raise SourceError("the follower moved or closed while a catch-up was being sent")
                data = self._page(pgno, latest, header, self.page_size, scratch)
                if scratch.hashes[pgno] != self.hashes.hashes.get(pgno):
                    raise ResnapshotNeeded(f"page {pgno} differs from the hash kept for it at {position}")
            yield pgno, data

    def _latest_frames(self, position: Position) -> dict[int, int]:
        """The newest frame of each page in the WAL up to ``position`` (frame headers only)."""
        header = self._header
        latest: dict[int, int] = {}
        if header is None or header.generation != position.generation:
            return latest
        for index in range(1, position.frame + 1):
            info = self._wal.frame_header(header, index)
            if info is None or info[2] != header.raw_salts:
                raise SourceError(f"WAL frame {index} of {position} is gone while the guard held it")
            latest[info[0]] = index
        return latest

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

        ``stop_at`` ends the batch exactly at that frame (so a replica passes
        through a position a verify was computed at). Raises
        :class:`ResnapshotNeeded` when continuity is lost.
        """
        assert self.position is not None
        self._finish_deferred()
        started = self._clock()
        self.pending_frames = 0
        try:
            header, mx, generation = self._current()
        except WalFormatError:
            return None  # caught a restart half-way; the next poll sees it whole
        prev = self.position
        announced = self.announced or prev
        if generation != prev.generation:
            self._end_of_generation(prev)
            self._hold_restarts()
            self._header = header if header is not None and header.generation == generation else None
            if header is None or mx == 0:
                # A restart (or truncation) that has not written a frame yet: same content, new generation.
                self.position = Position(generation, 0)
                self._note(self.position)
                return None
            if header.page_size != self.page_size:
                raise ResnapshotNeeded(f"page size changed from {self.page_size} to {header.page_size}")
            start = 1
        else:
            if header is not None:
                self._header = header
            if self._ended_at is not None and mx > self._ended_at.frame:
                self._ended_at = None  # it went on instead of restarting: no restart is possible now
            if self._ended_at is None and self.hold != "restart":
                self._hold_restarts()  # (read-mark 0 kept it while every slot was busy)
            start = prev.frame + 1
            if mx < prev.frame:
                raise ResnapshotNeeded(f"WAL has {mx} committed frames, fewer than the {prev.frame} shipped")
            if header is not None and self._restart_due(mx, prev, stop_at):
                shipped = self._restart_wal(header, announced, started)
                if shipped is not False:
                    return shipped
            if mx == prev.frame and self._someone_waits():
                self._make_way(prev)
        if header is None or mx < start:
            self.last_current_at = started
            return None
        last = min(mx, start + MAX_FRAMES_PER_POLL - 1)
        if stop_at is not None and stop_at.generation == header.generation and start <= stop_at.frame < last:
            last = stop_at.frame
        if last < mx and self._inside_transaction(header, last):
            # A transaction larger than one chunk (see _ship_large): its frames are not read here.
            return self._ship_large(header, start, mx, announced, started)
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
        if frames[-1].index == mx and stop_at is None and self._window_due(mx):
            frames += self._window(header, mx)
            mx = max(mx, frames[-1].index)
        return self._ship(frames, header.generation, announced, started, mx_after=mx)

    def _end_of_generation(self, prev: Position) -> None:
        """The generation of ``prev`` has been restarted: check that nothing of it was missed.

        The guard lets the WAL restart only while read-mark 0 is held at a
        frame read and copied (``_ended_at``): the generation ended exactly
        there, and any generation in between had no frame (see
        :mod:`walguard`). A generation entered at frame 0 was held from then
        on. Anything else means someone did not respect the wal-index locks
        (the ``-shm`` file replaced, a process without locking): what
        happened meanwhile cannot be known, and a resync follows.
        """
        ended, self._ended_at = self._ended_at, None
        if ended == prev and self._ended_by == "window":
            self.window_restarts += 1
        if ended == prev or prev.frame == 0:
            return
        raise ResnapshotNeeded(
            f"the WAL restarted after {prev} while the agent held it (hold: {self.hold}, could restart at"
            f" {ended}): were the wal-index locks bypassed?"
        )

    # -- letting the WAL restart -------------------------------------------------

    def _window_due(self, mx: int) -> bool:
        return bool(
            self.restart_frames
            and mx >= self.restart_frames - self.restart_frames // WINDOW_EARLY
            and self.hold == "restart"
            and time.monotonic() >= self._next_window
        )

    def _window(self, header: WalHeader, read_to: int) -> list[Frame]:
        """Let the application restart the WAL at a frame we have read (tried for at most ``window_s``).

        The guard's mark becomes :data:`COPY_ALL`: the application's
        checkpoints copy everything, the WAL still cannot restart. Every commit
        that appears meanwhile is read (returned, to ship with the frames up to
        ``read_to``). At the instant a checkpoint has copied everything
        committed, the guard is handed over to read-mark 0 (after reading any
        frame still unread, while nothing can move): from then on the WAL can
        restart only there (``_ended_at``), at the application's next commit.
        If it commits instead (an application reader kept it from restarting),
        :meth:`poll` takes the guard back. An application that does not
        checkpoint while everything is read (idle, or under its threshold) has
        the copy made for it, in this thread (unless ``checkpoint_frames`` is
        0: then the follower never writes). Ends, holding again, if the commits
        exceed a batch or no checkpoint came. No step lets the WAL restart past
        an unread frame.
        """
        generation = header.generation
        extra: list[Frame] = []
        if not self._guard.block_restart(COPY_ALL) or self._guard.value != COPY_ALL:
            self._next_window = time.monotonic() + WINDOW_RETRY_S
            return extra
        self.windows += 1
        deadline = time.monotonic() + self.window_s
        quiet = True  # no commit during the whole window: a slow writer, try much later

        def all_read_and_copied() -> bool:
            """Run holding read-mark 0 and the slot: nothing can be copied or restarted meanwhile."""
            nonlocal read_to
            _h, mx, now = self._current()
            if now != generation or mx != self._backfilled():
                return False
            if mx - read_to + len(extra) > MAX_FRAMES_PER_POLL:
                return False
            extra.extend(self._wal.frames(header, read_to + 1, mx))
            read_to = mx
            return True

        handed_over = False
        mx = read_to
        try:
            while time.monotonic() < deadline:
                try:
                    mx = self._current()[1]
                    if mx > read_to:
                        quiet = False
                    if mx == read_to and self._backfilled() < mx and self.checkpoint_frames:
                        # Nothing new and no checkpoint of its own yet (an idle application, or
                        # one under its threshold): copy in our thread, off its commit path.
                        self._checkpoint(mx)
                    if self._guard.hand_over(all_read_and_copied, wait_for_copy=True):
                        handed_over = True
                        self._ended_at = Position(generation, read_to)
                        self._ended_by = "window"
                        return extra
                except WalFormatError:
                    pass  # a frame overwritten cannot be (the WAL cannot restart): a torn read, look again
                if len(extra) + mx - read_to > MAX_FRAMES_PER_POLL:
                    break
                time.sleep(WINDOW_POLL_S)
            # No checkpoint copied everything: an application that kept committing is given another
            # window soon (its reader held one off, or its WAL was under its own threshold); a
            # quiet one, much later.
            self._next_window = time.monotonic() + (WINDOW_BACKOFF_S if quiet else WINDOW_RETRY_S)
            return extra
        finally:
            if not handed_over:
                self._hold_restarts()

    def _inside_transaction(self, header: WalHeader, index: int) -> bool:
        """Is frame ``index`` of this generation a frame before its transaction's commit? (One 16-byte
        read: a VACUUM's first poll read 4,096 whole frames only to find that out.)"""
        found = self._wal.frame_header(header, index)
        return found is not None and found[2] == header.raw_salts and not found[1]

    def _ship_large(
        self, header: WalHeader, start: int, mx: int, announced: Position, started: float
    ) -> Batch:
        """The transaction starting at frame ``start`` and larger than one chunk, as a lazy batch.

        Only its frame headers are read now (which frame holds the newest
        version of each page, the size at its commit): the position moves at
        once, and the pages are read, hashed, filtered (:meth:`_unchanged`)
        and sent a run at a time by the batch's reader, so that hashing a
        VACUUM overlaps sending it instead of coming first (it took 0.7 s of
        a 62 MB VACUUM's catch-up, before the first byte left). The
        checksum is known when the last page has been hashed: the batch
        carries it in BATCH_END. Until then the hashes are being brought to
        this position (``_deferred``); any other use of the follower first
        completes them (:meth:`_finish_deferred`), e.g. after a session that
        ended half-way. The guard keeps those frames in place: no window
        opens before the next poll, which completes the hashing first.
        """
        latest: dict[int, int] = {}
        end = commit_size = 0
        index = start
        while not end:
            infos = self._wal.headers(header, index, min(mx, index + MAX_FRAMES_PER_POLL - 1))
            if not infos:
                raise ResnapshotNeeded(f"the WAL ended at frame {index - 1} inside a committed transaction")
            for offset, (pgno, commit) in enumerate(infos):
                latest[pgno] = index + offset
                if commit:
                    end, commit_size = index + offset, commit
                    break
            index += len(infos)
        min_pages = min(self.hashes.db_pages, commit_size)
        refs = sorted((pgno, i) for pgno, i in latest.items() if pgno <= commit_size)
        before = {pgno: self.hashes.hashes.get(pgno, 0) for pgno, _i in refs}
        self.hashes.truncate(commit_size)
        self.position = self.announced = Position(header.generation, end)
        self._note(self.position)
        self.frames_shipped += end - start + 1
        self.pending_frames = mx - end
        if end == mx:
            self.last_current_at = started
        batch = self._tx_batch(
            announced,
            min_pages,
            transactions=1,
            frames=end - start + 1,
            page_count=len(refs),  # at most: unchanged pages are left out as they are hashed
        )
        deferred = _Deferred(header, refs, before, min_pages, batch)
        self._deferred = deferred

        def read() -> Iterator[tuple[int, bytes]]:
            while (pages := self._hash_next(deferred)) is not None:
                yield from pages

        batch.page_reader = read
        return batch

    @_locked
    def _hash_next(self, deferred: _Deferred) -> list[tuple[int, bytes]] | None:
        """The next run of ``deferred``'s pages, hashed into our state; those to send (None: done)."""
        if self._deferred is not deferred:
            return None  # completed (by a poll after its session ended) or superseded
        run = next(_runs(deferred.refs[deferred.next : deferred.next + READ_RUN]))
        frames = self._wal.frames(deferred.header, run[0][1], run[-1][1])
        out = []
        for (pgno, _i), frame in zip(run, frames, strict=True):
            self.hashes.set(pgno, frame.data)
            if self._unchanged(pgno, deferred.before[pgno], deferred.min_pages):
                self.pages_unchanged += 1
            else:
                out.append((pgno, frame.data))
        deferred.next += len(run)
        if deferred.next >= len(deferred.refs):
            self._deferred = None
            deferred.batch.checksum = self.hashes.checksum  # sent in BATCH_END
        return out

    def _finish_deferred(self) -> None:
        """Bring the hashes to our position if a large batch's reader did not (its session ended)."""
        deferred = self._deferred
        while deferred is not None and self._deferred is deferred:
            self._hash_next(deferred)

    def _ship(
        self,
        frames: list[Frame],
        generation: Generation,
        announced: Position,
        started: float,
        mx_after: int,
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
        same = set()
        for pgno, data in unhashed.items():
            before = self.hashes.hashes.get(pgno, 0)  # (pages past min_pages may be gone: sent anyway)
            self.hashes.set(pgno, data)
            if self._unchanged(pgno, before, min_pages):
                same.add(pgno)
        self.pages_unchanged += len(same)
        db_pages = self.hashes.db_pages
        end = frames[-1].index
        self.position = self.announced = Position(generation, end)
        self._note(self.position)
        self.frames_shipped += len(frames)
        self.pending_frames = mx_after - end
        if end == mx_after:
            self.last_current_at = started
        return self._tx_batch(
            announced,
            min_pages,
            transactions=transactions,
            frames=len(frames),
            pages={p: d for p, d in pages.items() if p <= db_pages and p not in same},
        )

    def _unchanged(self, pgno: int, before: int, min_pages: int) -> bool:
        """Whether page ``pgno`` ends a batch exactly as the replica already has it (not sent).

        ``before`` is its hash in the state the batch starts from, which is the
        replica's. A page at or below ``min_pages`` is never cut off by the
        replica, so one whose hash (of its number and content) did not change
        needs no bytes: a VACUUM rewrites every page, and those it leaves as
        they were cost nothing on the wire, in the replica's journal or on its
        disk. The batch's checksum is unaffected (same hash), so the replica
        still proves the whole result before writing.
        """
        return pgno <= min_pages and before != 0 and self.hashes.hashes.get(pgno) == before

    def _tx_batch(self, announced: Position, min_pages: int, **content: Any) -> Batch:
        """The batch from ``announced`` to our position, with the state the hashes now describe."""
        assert self.position is not None
        return Batch(
            kind="tx",
            prev=announced,
            position=self.position,
            page_size=self.page_size,
            db_pages=self.hashes.db_pages,
            min_pages=min_pages,
            checksum=self.hashes.checksum,
            observed_at=self.last_current_at,
            pending_frames=self.pending_frames,
            **content,
        )

    def _someone_waits(self) -> bool:
        """The write lock held for ``YIELD_AFTER_S`` while nothing was committed: most likely the
        application's FULL, RESTART or TRUNCATE checkpoint, which waits for readers (for as long
        as its busy timeout) holding its writers off meanwhile."""
        if self.hold != "restart":
            self._write_held_since = None
            return False
        try:
            held = self._guard.write_locked()
        except GuardError:
            return False
        now = time.monotonic()
        if not held:
            self._write_held_since = None
            return False
        if self._write_held_since is None:
            self._write_held_since = now
        return now - self._write_held_since >= YIELD_AFTER_S

    def _make_way(self, read: Position) -> None:
        """Everything up to ``read`` is read and nothing more committed: let it be copied and, once
        it all is, hold read-mark 0 so that a checkpoint may restart the WAL.

        Safe whoever holds the write lock: with read-mark 0 held nothing more is
        copied, so the WAL restarts only if the copy reached ``read`` and no
        frame came after it; frames that do come are seen on the next poll (the
        WAL cannot restart past them) and the guard is taken back (see ``poll``).
        """
        self.yields += 1
        if not self._guard.block_restart(read.frame):
            return
        if self._backfilled() >= read.frame and self._guard.block_copy():
            self._ended_at, self._ended_by = read, "yield"
            self._write_held_since = None

    # -- restarting the WAL ourselves ----------------------------------------------

    def _restart_due(self, mx: int, prev: Position, stop_at: Position | None) -> bool:
        return bool(
            self.checkpoint_frames
            and mx >= self.checkpoint_frames
            and self.hold == "restart"
            and mx - prev.frame < MAX_FRAMES_PER_POLL
            and (stop_at is None or stop_at.generation != prev.generation or stop_at.frame <= prev.frame)
            and time.monotonic() >= self._next_restart
        )

    def _rw_conn(self) -> sqlite3.Connection:
        """The connection our checkpoints run on: never waits (busy means someone else copies)."""
        if self._rw is None:
            self._rw = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
            self._rw.execute("PRAGMA busy_timeout = 0")
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
        # First copy what we have read, without holding anyone off, so that under the write
        # lock only the frames committed since are left to copy.
        self._precopy(self.position.frame)
        if not self._write_lock():
            self._hold_restarts()
            self._next_restart = time.monotonic() + RESTART_RETRY_S
            return False
        wlock = self._wlock
        assert wlock is not None
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
            self._guard.release()  # our mark must not stop the copy
            try:
                self._checkpoint(mx)
            finally:
                # All copied: hold read-mark 0 (no more copies; the next commit restarts the WAL).
                # Else (an application reader kept the copy short) hold it in place again.
                if self._backfilled() >= mx and self._guard.block_copy():
                    self._ended_at, self._ended_by = Position(generation, mx), "ours"
                    self.restarts += 1
                    self._next_restart = 0.0
                else:
                    self._hold_restarts()
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
        return self._ship(frames, generation, announced, started, mx_after=mx)

    def _precopy(self, upto: int) -> None:
        """Let the frames up to ``upto`` (all read) be copied into the database file now."""
        if upto and self._guard.block_restart(upto):
            self._checkpoint(upto)

    def _checkpoint(self, upto: int) -> bool:
        """PASSIVE checkpoints until frame ``upto`` is copied, for at most ``checkpoint_busy_ms``.

        Busy means another checkpoint holds the lock: most often the
        application's own attempt, copying the same frames (with its two
        fsyncs); we wait for it rather than give up.
        """
        deadline = time.monotonic() + self.checkpoint_busy_ms / 1000
        try:
            rw = self._rw_conn()
            while True:
                self.checkpoints += 1
                rw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                if self._backfilled() >= upto or time.monotonic() >= deadline:
                    return self._backfilled() >= upto
                time.sleep(0.0002)
        except sqlite3.Error as exc:
            log.debug("checkpoint failed", extra=kv(error=str(exc)))
            return False

    def _write_lock(self) -> bool:
        """``BEGIN IMMEDIATE`` within ``checkpoint_busy_ms``, tried every 50 µs.

        Not SQLite's busy handler: it sleeps 1, 2, 5, 10 ms between tries, and
        against a writer that commits every few microseconds it lost the race
        nine times in ten (seen flat out), while the WAL grew by megabytes.
        """
        if self._wlock is None:
            self._wlock = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
            self._wlock.execute("PRAGMA busy_timeout = 0")
        deadline = time.monotonic() + self.checkpoint_busy_ms / 1000
        while True:
            try:
                self._wlock.execute("BEGIN IMMEDIATE")
                return True
            except sqlite3.OperationalError as exc:
                if time.monotonic() >= deadline:
                    log.debug("no write lock for a WAL restart", extra=kv(error=str(exc)))
                    return False
            time.sleep(0.00005)

    def _backfilled(self) -> int:
        """nBackfill of the wal-index: frames already copied into the database file."""
        fds = self._wal._fds()
        if fds is None:
            return 0
        raw = os.pread(fds[1], 4, 96)
        return int.from_bytes(raw, sys.byteorder) if len(raw) == 4 else 0


@dataclass(slots=True)
class _Deferred:
    """A large transaction shipped before its pages were hashed (see ``_ship_large``)."""

    header: WalHeader
    refs: list[tuple[int, int]]  # (page, newest frame), in page order
    before: dict[int, int]  # each page's hash in the state the batch starts from
    min_pages: int
    batch: Batch
    next: int = 0  # refs hashed so far


READ_RUN = 256  # frames read with one pread when a batch's pages are consecutive frames (1 MiB)


def _runs(refs: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
    """``refs`` ((page, frame) in page order) cut into runs of consecutive frames.

    A VACUUM writes its pages in page order, so its batch is a few long runs:
    read with one ``pread`` each instead of one a page (measured: 15,000
    single-frame reads took 0.5 s of a 62 MB VACUUM's 3.7 s catch-up).
    """
    run: list[tuple[int, int]] = []
    for ref in refs:
        if run and (ref[1] != run[-1][1] + 1 or len(run) >= READ_RUN):
            yield run
            run = []
        run.append(ref)
    if run:
        yield run


def describe_source(db_path: Path) -> dict[str, object]:
    """A small, read-only description for status output."""
    try:
        st = os.stat(db_path)
    except FileNotFoundError:
        return {"path": str(db_path), "exists": False}
    log.debug("described", extra=kv(path=db_path))
    return {"path": str(db_path), "exists": True, "size_bytes": st.st_size}
