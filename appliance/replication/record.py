"""The replica's recorded page hashes: what its file must hold, persisted beside it.

Why: a replica is promoted when the primary is gone, so the only thing its
file can be checked against then is what the backup itself recorded when it
applied the last verified batch. Recomputing hashes from whatever file is
there proves nothing; comparing the file with this record does, and says
which pages differ (a resync then asks the source for just those).

File ``<replica>.hotsite/pagehashes`` (big-endian):

====== ===== =====================================================
offset bytes
0      4     magic ``HSPH``
4      2     format version (1)
6      2     reserved (0)
8      4     page size
12     4     pages in the database (``db_pages``)
16     8     sequence number of the replica journal whose state it records
24     4     CRC-32 of bytes 0..23
28     4     reserved (0)
32     8·n   the hash of page 1, 2, … n (``checksum.page_hash``)
====== ===== =====================================================

The whole-database checksum recorded is the XOR of the entries.

Durability: after a batch is written into the database file, its pages'
entries and then the header are written in place and fsynced, before the
next journal can be written. A crash in between is repaired by recovery,
which redoes the newest journal and its entries (idempotent). After a seed
or a repair the file is written whole to ``pagehashes.new`` and renamed
into place (fsync of file and directory). A batch applied by building a new
database file (a VACUUM) writes its record whole to ``pagehashes.next``
before its journal; recovery takes it over only if its own sequence number
is that journal's (a leftover of a later, torn batch is never taken). Only
the replica writes it.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from appliance.replication.checksum import PageHashes

MAGIC = b"HSPH"
VERSION = 1
_HEADER = struct.Struct(">4sHHIIQ")  # magic, version, reserved, page size, db pages, seq
HEADER_SIZE = 32
_ENTRY = struct.Struct(">Q")


@dataclass(frozen=True, slots=True)
class Recorded:
    """One loaded record: its header and the raw entries (8 bytes a page)."""

    page_size: int
    db_pages: int
    seq: int
    entries: bytes

    def hash_of(self, pgno: int) -> int:
        if pgno > self.db_pages:
            return 0
        return int.from_bytes(self.entries[(pgno - 1) * 8 : pgno * 8], "big")

    @property
    def checksum(self) -> int:
        value = 0
        for (entry,) in _ENTRY.iter_unpack(self.entries):
            value ^= entry
        return value


def _header(page_size: int, db_pages: int, seq: int) -> bytes:
    head = _HEADER.pack(MAGIC, VERSION, 0, page_size, db_pages, seq)
    return head + struct.pack(">II", zlib.crc32(head), 0)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HashRecord:
    """Read, update in place, and rewrite atomically the ``pagehashes`` file of one replica."""

    def __init__(self, directory: Path, *, durable: bool = True) -> None:
        self.path = directory / "pagehashes"
        self.new_path = directory / "pagehashes.new"
        self.seed_path = directory / "pagehashes.seed"
        self.next_path = directory / "pagehashes.next"
        self._durable = durable

    def load(self, path: Path | None = None) -> Recorded | None:
        """The record, or None when it is absent or its header is not one we wrote."""
        try:
            raw = (path or self.path).read_bytes()
        except FileNotFoundError:
            return None
        if len(raw) < HEADER_SIZE:
            return None
        magic, version, _r, page_size, db_pages, seq = _HEADER.unpack_from(raw)
        (crc,) = struct.unpack_from(">I", raw, 24)
        if magic != MAGIC or version != VERSION or crc != zlib.crc32(raw[:24]):
            return None
        entries = raw[HEADER_SIZE : HEADER_SIZE + 8 * db_pages]
        if len(entries) != 8 * db_pages:
            return None
        return Recorded(page_size, db_pages, seq, entries)

    def update(self, changes: Iterable[tuple[int, int]], page_size: int, db_pages: int, seq: int) -> None:
        """Write the entries of the pages a batch changed, then the header, then fsync."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            for pgno, value in changes:
                if pgno <= db_pages:
                    os.pwrite(fd, _ENTRY.pack(value), HEADER_SIZE + 8 * (pgno - 1))
            if os.fstat(fd).st_size != HEADER_SIZE + 8 * db_pages:
                os.ftruncate(fd, HEADER_SIZE + 8 * db_pages)
            os.pwrite(fd, _header(page_size, db_pages, seq), 0)
            if self._durable:
                os.fsync(fd)
        finally:
            os.close(fd)

    def touch(self, seq: int) -> None:
        """Record that journal ``seq`` (a promotion, a demotion) left the pages as they were."""
        current = self.load()
        if current is not None:
            self.update([], current.page_size, current.db_pages, seq)

    def write_whole(
        self,
        hashes: PageHashes,
        page_size: int,
        seq: int,
        *,
        staged: bool = False,
        target: Path | None = None,
    ) -> None:
        """Write every entry to a new file and rename it into place (or leave it staged for a seed, or
        at ``target``)."""
        staged = staged or target is not None
        target = target or (self.seed_path if staged else self.new_path)
        try:
            with open(target, "wb") as f:
                f.write(_header(page_size, hashes.db_pages, seq))
                f.write(hashes.packed())
                f.flush()
                if self._durable:
                    os.fsync(f.fileno())
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        if not staged:
            os.replace(target, self.path)
            if self._durable:
                _fsync_dir(self.path.parent)

    def commit_staged(self, seq: int) -> None:
        """Journal ``seq``'s seed record, written before that journal, takes over (idempotent);
        one staged by a later seed that never got its journal is dropped."""
        self._take_over(self.seed_path, seq)

    def stage_next(self, hashes: PageHashes, page_size: int, seq: int) -> None:
        """The record of journal ``seq``'s state, written whole before that journal (a rewrite)."""
        self.write_whole(hashes, page_size, seq, target=self.next_path)

    def commit_next(self, seq: int) -> None:
        """Take over the staged record if it is journal ``seq``'s (idempotent; any other is dropped)."""
        self._take_over(self.next_path, seq)

    def _take_over(self, staged_path: Path, seq: int) -> None:
        """``staged_path`` becomes the record if it is journal ``seq``'s; otherwise it is dropped
        (a leftover of a later batch whose journal was torn describes no state)."""
        staged = self.load(staged_path)
        if staged is not None and staged.seq == seq:
            os.replace(staged_path, self.path)
            if self._durable:
                _fsync_dir(self.path.parent)
        else:
            staged_path.unlink(missing_ok=True)

    def discard_leftovers(self) -> None:
        self.new_path.unlink(missing_ok=True)
        self.seed_path.unlink(missing_ok=True)
        self.next_path.unlink(missing_ok=True)
