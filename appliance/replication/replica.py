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
- After :meth:`promote` nothing is applied until :meth:`demote`, which
  refuses when the promoted copy has changed unless told to discard changes.

All methods block (file I/O, fsync): call them from a worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import HotsiteError
from appliance.replication.checksum import PageHashes, page_hash, show
from appliance.replication.position import Batch, Position

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


@dataclass(frozen=True, slots=True)
class Promotion:
    at: float
    position: Position | None
    checksum: int
    data_loss_window_s: float | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "position": None if self.position is None else self.position.to_json(),
            "checksum": show(self.checksum),
            "data_loss_window_s": self.data_loss_window_s,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, v: dict[str, Any]) -> Promotion:
        return cls(
            at=float(v["at"]),
            position=None if v["position"] is None else Position.from_json(v["position"]),
            checksum=int(v["checksum"], 16),
            data_loss_window_s=v["data_loss_window_s"],
            reason=str(v.get("reason", "")),
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

    # -- open / recover --------------------------------------------------

    def open(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReplicaError(f"replica directory {self.dir} cannot be created: {exc.strerror}") from None
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ReplicaError(f"replica {self.path} is being applied by another process") from None
        self._lock_fd = fd
        self._recover()

    def close(self) -> None:
        for name in ("_seed_fd", "_db_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def _journal_path(self, seq: int) -> Path:
        return self.dir / f"journal-{seq % 2}"

    def _read_journal(self, path: Path) -> tuple[int, dict[str, Any], list[tuple[int, bytes]]] | None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(raw) < _HEAD.size + 8 or raw[-4:] != TRAILER:
            return None
        body, crc = raw[:-8], struct.unpack(">I", raw[-8:-4])[0]
        if zlib.crc32(body) != crc:
            return None
        magic, seq, hlen = _HEAD.unpack_from(body)
        if magic != MAGIC:
            return None
        header = json.loads(body[_HEAD.size : _HEAD.size + hlen])
        pages = []
        offset = _HEAD.size + hlen
        size = int(header.get("page_size") or 0)
        while offset < len(body):
            (pgno,) = _PAGE.unpack_from(body, offset)
            pages.append((pgno, body[offset + 4 : offset + 4 + size]))
            offset += 4 + size
        return seq, header, pages

    def _recover(self) -> None:
        found = [j for j in (self._read_journal(self.dir / f"journal-{i}") for i in (0, 1)) if j is not None]
        seed = self.dir / "seed.tmp"
        if not found:
            seed.unlink(missing_ok=True)
            self._open_db(load=False)
            return
        seq, header, pages = max(found, key=lambda j: j[0])
        self.seq = seq
        kind = header["kind"]
        if kind == "seed":
            if seed.exists():
                os.replace(seed, self.path)
                if self._durable:
                    _fsync_dir(self.path.parent)
        else:
            seed.unlink(missing_ok=True)
        self._load_header(header)
        self._open_db(load=False)
        if kind in ("tx", "resync") and not self.promotion:
            self._write_pages(header, pages)  # redo: idempotent
        self._load_hashes()

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
        head = json.dumps(header, sort_keys=True).encode()
        parts = [_HEAD.pack(MAGIC, seq, len(head)), head]
        for pgno, data in pages:
            parts.append(_PAGE.pack(pgno))
            parts.append(data)
        body = b"".join(parts)
        path = self._journal_path(seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, body + struct.pack(">I", zlib.crc32(body)) + TRAILER)
            if self._durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.seq = seq
        return seq

    def _write_pages(self, header: dict[str, Any], pages: Iterable[tuple[int, bytes]]) -> None:
        assert self._db_fd is not None
        size = int(header["page_size"])
        min_pages, db_pages = int(header["min_pages"]), int(header["db_pages"])
        if os.fstat(self._db_fd).st_size > min_pages * size:
            os.ftruncate(self._db_fd, min_pages * size)
        for pgno, data in pages:
            if pgno <= db_pages:
                os.pwrite(self._db_fd, data, (pgno - 1) * size)
        os.ftruncate(self._db_fd, db_pages * size)
        if self._durable:
            os.fsync(self._db_fd)

    # -- apply -----------------------------------------------------------

    def _check_writable(self) -> None:
        if self.promotion is not None:
            raise PromotedError(
                f"replica {self.path} was promoted at {time.ctime(self.promotion.at)}: replication into it"
                " stays off until 'hotsite replication demote' (see 'hotsite replication status')"
            )

    def apply(self, batch: Batch) -> None:
        """Apply one batch atomically, or raise :class:`BatchRejected` having written nothing."""
        with self._mutex:
            self._check_writable()
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
            self._write_journal(header, pages)
            self._write_pages(header, pages)
            self.page_size = batch.page_size
            if self.hashes.db_pages > batch.min_pages:
                self.hashes.truncate(batch.min_pages)
            for pgno, data in pages:
                if pgno <= batch.db_pages:
                    self.hashes.set(pgno, data)
            self.hashes.truncate(batch.db_pages)
            self.hashes.db_pages = batch.db_pages
            self.position = batch.position
            self.observed_at = batch.observed_at
            self.applied_at = now
            self.batches_applied += 1

    def _preview(self, batch: Batch) -> int:
        checksum = self.hashes.checksum
        written = {p for p in batch.pages if p <= batch.db_pages}
        for pgno, value in self.hashes.hashes.items():
            if (pgno > batch.min_pages or pgno > batch.db_pages) and pgno not in written:
                checksum ^= value
        for pgno in written:
            old = self.hashes.hashes.get(pgno, 0)
            checksum ^= old ^ page_hash(pgno, batch.pages[pgno])
        return checksum

    # -- seed (a whole new database, replacing the file) -------------------

    def seed_begin(self, page_size: int, db_pages: int) -> None:
        with self._mutex:
            self._check_writable()
            if self._seed_fd is not None:
                os.close(self._seed_fd)
            self._seed_fd = os.open(self.dir / "seed.tmp", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o640)
            self._seed_hashes = PageHashes()
            self._seed_hashes.db_pages = db_pages
            self._seed_meta = {"page_size": page_size, "db_pages": db_pages}

    def seed_pages(self, pages: Iterable[tuple[int, bytes]]) -> None:
        assert self._seed_fd is not None and self._seed_hashes is not None
        size = self._seed_meta["page_size"]
        for pgno, data in pages:
            os.pwrite(self._seed_fd, data, (pgno - 1) * size)
            self._seed_hashes.set(pgno, data)

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
            self._write_journal(header, [])
            os.replace(self.dir / "seed.tmp", self.path)
            if self._durable:
                _fsync_dir(self.path.parent)
            self._open_db(load=False)
            self.hashes = hashes
            self.page_size = self._seed_meta["page_size"]
            self.position = position
            self.observed_at = observed_at
            self.applied_at = now
            self._seed_hashes = None

    def seed_abort(self) -> None:
        if self._seed_fd is not None:
            os.close(self._seed_fd)
            self._seed_fd = None
        (self.dir / "seed.tmp").unlink(missing_ok=True)
        self._seed_hashes = None

    # -- reading -----------------------------------------------------------

    @property
    def checksum(self) -> int:
        return self.hashes.checksum

    def full_checksum(self) -> int:
        """Recompute the checksum from the file (independent of the rolling value)."""
        with self._mutex:
            return file_checksum(self.path, self.page_size) if self.page_size else 0

    @contextlib.contextmanager
    def locked(self) -> Iterator[Path]:
        """Hold off apply while the caller reads the file (copy it, compute over it)."""
        with self._mutex:
            yield self.path

    def copy_to(self, dest: Path) -> Position | None:
        """A consistent copy of the current state (for snapshots kept for restore)."""
        with self._mutex:
            tmp = dest.with_name(dest.name + ".tmp")
            with open(self.path, "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                out.flush()
                if self._durable:
                    os.fsync(out.fileno())
            os.replace(tmp, dest)
            return self.position

    def status(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "position": None if self.position is None else str(self.position),
            "page_size": self.page_size,
            "db_pages": self.hashes.db_pages,
            "checksum": show(self.hashes.checksum),
            "observed_at": self.observed_at,
            "applied_at": self.applied_at,
            "promoted": None if self.promotion is None else self.promotion.to_json(),
        }

    # -- promotion ---------------------------------------------------------

    def promote(self, data_loss_window_s: float | None, reason: str) -> Promotion:
        """Stop applying for good and record the final position; the file is then the writable copy."""
        with self._mutex:
            if self.promotion is not None:
                return self.promotion
            promotion = Promotion(
                at=self._clock(),
                position=self.position,
                checksum=self.hashes.checksum,
                data_loss_window_s=data_loss_window_s,
                reason=reason,
            )
            self.promotion = promotion
            self._write_journal({"kind": "promote", **self._state_header(), "min_pages": 0}, [])
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

    def demote(self, discard_local_writes: bool = False) -> None:
        """Accept replication again after a promotion; refuses to silently drop the backup's writes."""
        with self._mutex:
            if self.promotion is None:
                return
            changes = self.local_changes()
            if changes and not discard_local_writes:
                raise PromotedError(
                    f"refusing to resume replication into {self.path}: {changes}. Copy it back to the"
                    " primary first (hotsite replication restore --from-replica, then restart the"
                    " application there on that copy), or discard the backup's writes explicitly with"
                    " 'hotsite replication demote --discard-local-writes'"
                )
            for suffix in ("-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            self.promotion = None
            self._write_journal({"kind": "demote", **self._state_header(), "min_pages": 0}, [])
            self._open_db(load=True)
            self.needs_resync = True


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
