"""Hold a SQLite WAL in place the way a reader does, without being one.

A SQLite reader announces itself in the wal-index (``-shm``) by a shared
lock on one of its read-mark slots; the slot's value is the last WAL frame
the reader may need from the WAL rather than from the database file. That
one lock does two things to everybody else (https://www.sqlite.org/walformat.html,
"the wal-index", and "locks"):

- a checkpoint copies frames into the database file only up to the smallest
  held mark (slot 0 held: none at all);
- the WAL is restarted (overwritten from its first frame, with new salts)
  only when every slot 1..4 can be locked exclusively.

The follower needs exactly these two effects, chosen deliberately, and a
real read transaction cannot give them: SQLite picks its mark (the newest
frame at ``BEGIN``, or slot 0 when the WAL happens to be fully copied), and
a mark that moves hands the application's auto-checkpoint a few frames to
copy, with two fsyncs, in its commit path. So :class:`ReadMarkGuard` takes
the slots itself:

- :meth:`ReadMarkGuard.block_restart` holds a slot 1..4 whose value is 0:
  nothing more is copied and the WAL is never restarted while it is held
  (the application's checkpoint attempts find nothing to do, which is cheap);
- :meth:`ReadMarkGuard.block_restart` with :data:`COPY_ALL` as the mark: the
  application's checkpoints copy every frame, the WAL still never restarts;
- :meth:`ReadMarkGuard.block_copy` holds slot 0: nothing is copied, but the
  WAL may restart (used once everything in it has been read and copied);
  :meth:`ReadMarkGuard.hand_over` gets there from a slot 1..4 only if a
  condition still holds once slot 0 is held (nothing can be copied from then
  on, so what the condition read cannot change, and no restart could come in
  between: the slot 1..4 is let go last);
- :meth:`ReadMarkGuard.release`: neither.

Why slot 0 is a safe hold once everything is read: with it held nothing is
copied, so ``nBackfill`` stays where it was (B), and SQLite restarts the WAL
only when ``nBackfill`` equals the last committed frame. The WAL can then
restart only at frame B of this generation, never past a frame committed
later; a generation begun meanwhile cannot restart either before one of its
frames is copied, so any generation skipped on the way had no frame.

The locks are open-file-description locks (``F_OFD_SETLK``): POSIX record
locks belong to the process, so SQLite's own connections in this process
would share them and drop them when they close; OFD locks conflict with
SQLite's POSIX locks in every process, ours included. Every call is
non-blocking and raises :class:`GuardError` only for a failure other than
"busy". Values are written the way ``walTryBeginRead`` writes them: under
an exclusive lock on the slot, then downgraded to shared.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from appliance.errors import HotsiteError

# wal-index layout (native byte order): two 48-byte copies of the header, then
# nBackfill (u32) at 96, aReadMark[0..4] (u32 each) from 100, lock bytes from 120.
READ_MARK_OFFSET = 100
LOCK_OFFSET = 120
READ_LOCK_0 = LOCK_OFFSET + 3  # WAL_READ_LOCK(0); slot i is READ_LOCK_0 + i
SLOTS = (1, 2, 3, 4)
# A mark above every frame: a checkpoint copies up to the newest frame as if the slot were free
# (SQLite only lowers its bound for marks below it, and readers choosing a slot ignore marks
# above the newest frame), but the slot still blocks restarts. READMARK_NOT_USED is 0xffffffff.
COPY_ALL = 0xFFFFFFFE
_FLOCK = "hhqqi4x"  # struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (0 for OFD)

Hold = Literal["restart", "copy", "none"]


class GuardError(HotsiteError):
    """The wal-index could not be opened or locked for a reason other than contention."""


class ReadMarkGuard:
    def __init__(self, shm_path: Path) -> None:
        self.shm_path = shm_path
        self._fd: int | None = None
        self._slot: int | None = None  # the slot we hold shared (0 = block_copy)
        self.value: int | None = None  # the mark of the slot held (None for slot 0)

    @property
    def hold(self) -> Hold:
        if self._slot is None:
            return "none"
        return "copy" if self._slot == 0 else "restart"

    def _open(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.shm_path, os.O_RDWR)
            except OSError as exc:
                raise GuardError(f"cannot open the wal-index {self.shm_path}: {exc.strerror}") from None
        return self._fd

    def _lock(self, kind: int, slot: int, wait: bool = False) -> bool:
        """One lock call on READ_LOCK(slot); False when another holder is in the way.

        ``wait``: block until it is granted instead (only used for slot 0, which
        a checkpoint holds exclusively just for as long as it copies frames).
        """
        try:
            lock = struct.pack(_FLOCK, kind, os.SEEK_SET, READ_LOCK_0 + slot, 1, 0)
            fcntl.fcntl(self._open(), fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, lock)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise GuardError(f"cannot lock read mark {slot} of {self.shm_path}: {exc.strerror}") from None
        return True

    def block_restart(self, mark: int = 0) -> bool:
        """Hold a read-mark slot at ``mark`` (see the module docstring); False if every slot is contended.

        Copies go up to ``mark`` (0: none). A different mark than the one held
        is taken in another slot before the old one is let go, so the WAL is
        never unguarded in between. If no slot is free, a slot another reader
        holds is shared as it is (it blocks restarts just the same, and its
        value is at most the newest frame, so the copy stays bounded).
        """
        if self.hold == "restart" and self.value == mark:
            return True
        previous = self._slot
        if not self._take_free_slot(mark):
            if self.hold == "restart":
                return True  # keep what we have: it blocks restarts, copies stay at its mark
            if not self._share_a_slot():
                return False
        if previous is not None and previous != self._slot:
            self._lock(fcntl.F_UNLCK, previous)
        return True

    def _take_free_slot(self, mark: int) -> bool:
        fd = self._open()
        for slot in SLOTS:
            if slot == self._slot or not self._lock(fcntl.F_WRLCK, slot):
                continue
            os.pwrite(fd, struct.pack("=I", mark), READ_MARK_OFFSET + 4 * slot)
            self._lock(fcntl.F_RDLCK, slot)  # a downgrade: never lost to someone else
            self._slot, self.value = slot, mark
            return True
        return False

    def _share_a_slot(self) -> bool:
        fd = self._open()
        for slot in SLOTS:
            if self._lock(fcntl.F_RDLCK, slot):
                self._slot = slot
                self.value = struct.unpack("=I", os.pread(fd, 4, READ_MARK_OFFSET + 4 * slot))[0]
                return True
        return False

    def block_copy(self) -> bool:
        """Hold slot 0 instead of whatever is held: nothing is copied, the WAL may restart."""
        if self.hold == "copy":
            return True
        if not self._lock(fcntl.F_RDLCK, 0):
            return False  # a checkpoint is copying right now; the caller tries again
        if self._slot is not None:
            self._lock(fcntl.F_UNLCK, self._slot)
        self._slot, self.value = 0, None
        return True

    def hand_over(self, still_safe: Callable[[], bool], wait_for_copy: bool = False) -> bool:
        """From a slot 1..4 to slot 0, if ``still_safe()`` is true once slot 0 is held.

        Slot 0 is taken first (nothing is copied from then on) and the other
        slot let go last (no restart in between), so ``still_safe`` reads a
        state that cannot move under it: typically "every committed frame is
        read and copied", which makes the coming restart's position exact.
        False (holding what was held before) when it is not, or when a
        checkpoint is copying at this instant, unless ``wait_for_copy``: then
        this waits for that copy to end (the instant to catch, see
        ``follower._window``).
        """
        if self.hold != "restart" or self._slot is None:
            return False
        previous = self._slot
        if not self._lock(fcntl.F_RDLCK, 0, wait=wait_for_copy and self.copying()):
            return False
        try:
            safe = still_safe()
        except BaseException:
            self._lock(fcntl.F_UNLCK, 0)
            raise
        if not safe:
            self._lock(fcntl.F_UNLCK, 0)
            return False
        self._lock(fcntl.F_UNLCK, previous)
        self._slot, self.value = 0, None
        return True

    def copying(self) -> bool:
        """Whether a checkpoint holds read-mark 0 exclusively now (it does while it copies frames)."""
        return self._held_by_others(READ_LOCK_0, fcntl.F_RDLCK)

    def write_locked(self) -> bool:
        """Whether some connection holds the WAL write lock now (a writer, or a checkpoint that
        waits for readers: FULL, RESTART and TRUNCATE take it first)."""
        return self._held_by_others(LOCK_OFFSET, fcntl.F_WRLCK)

    def _held_by_others(self, offset: int, kind: int) -> bool:
        """Whether a lock of ``kind`` on byte ``offset`` would conflict with someone else's."""
        probe = struct.pack(_FLOCK, kind, os.SEEK_SET, offset, 1, 0)
        try:
            got = fcntl.fcntl(self._open(), fcntl.F_OFD_GETLK, probe)
        except OSError as exc:
            raise GuardError(f"cannot test a lock of {self.shm_path}: {exc.strerror}") from None
        return struct.unpack(_FLOCK, got)[0] != fcntl.F_UNLCK

    def release(self) -> None:
        if self._slot is not None:
            self._lock(fcntl.F_UNLCK, self._slot)
        self._slot = self.value = None

    def close(self) -> None:
        self.release()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
