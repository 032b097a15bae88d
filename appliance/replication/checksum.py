"""The whole-database checksum both ends compute: XOR of per-page hashes.

LiteFS's idea: hash each page together with its page number, XOR them all.
XOR lets either end update the sum page by page as transactions arrive
(remove the old page's hash, add the new one) instead of re-reading the
database, and a full recomputation from the file gives the same value, so a
rolling value that drifted from the truth is caught by ``verify``.
Pages past the end of the database contribute nothing.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

_PGNO = struct.Struct(">I")


def page_hash(pgno: int, data: bytes | memoryview) -> int:
    h = hashlib.blake2b(_PGNO.pack(pgno), digest_size=8)
    h.update(data)
    return int.from_bytes(h.digest(), "big")


def show(checksum: int) -> str:
    return f"{checksum:016x}"


class PageHashes:
    """Per-page hashes of one database state and their XOR, kept in step."""

    def __init__(self) -> None:
        self.hashes: dict[int, int] = {}
        self.checksum = 0
        self.db_pages = 0

    def set(self, pgno: int, data: bytes | memoryview) -> int:
        new = page_hash(pgno, data)
        old = self.hashes.get(pgno, 0)
        self.hashes[pgno] = new
        self.checksum ^= old ^ new
        return new

    def truncate(self, db_pages: int) -> None:
        """The database now has ``db_pages`` pages: forget those past the end."""
        if db_pages < self.db_pages or len(self.hashes) > db_pages:
            for pgno in [p for p in self.hashes if p > db_pages]:
                self.checksum ^= self.hashes.pop(pgno)
        self.db_pages = db_pages

    def preview(self, pages: Iterable[tuple[int, bytes]], db_pages: int) -> int:
        """The checksum this state would have after writing ``pages`` and resizing, without changing it."""
        checksum = self.checksum
        seen: dict[int, int] = {}
        for pgno, data in pages:
            if pgno > db_pages:
                continue
            before = seen.get(pgno, self.hashes.get(pgno, 0))
            new = page_hash(pgno, data)
            checksum ^= before ^ new
            seen[pgno] = new
        for pgno, value in self.hashes.items():
            if pgno > db_pages and pgno not in seen:
                checksum ^= value
        return checksum

    def packed(self) -> bytes:
        """Hashes of pages 1..db_pages as big-endian u64s (0 for a page never seen)."""
        return b"".join(self.hashes.get(p, 0).to_bytes(8, "big") for p in range(1, self.db_pages + 1))


def unpack_hashes(raw: bytes) -> dict[int, int]:
    return {i // 8 + 1: int.from_bytes(raw[i : i + 8], "big") for i in range(0, len(raw), 8)}
