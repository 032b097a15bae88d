"""The SQLite WAL and wal-index file formats, read from outside SQLite.

Why read the files ourselves: the application that writes the customer
database is not ours (no triggers, no hooks, no schema change allowed), and
Python's ``sqlite3`` exposes no WAL hook. So the source agent reads what
SQLite itself reads: the ``-wal`` file (32-byte header, then frames of a
24-byte header plus one page) and the wal-index header in ``-shm``, whose
``mxFrame`` is the last *committed* frame — exactly the bound a SQLite
reader uses for its snapshot. Frames beyond ``mxFrame`` belong to a
transaction still being written (or rolled back) and are never shipped.

Formats: https://www.sqlite.org/fileformat2.html#walformat and
https://www.sqlite.org/walformat.html (wal-index header, two copies).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

WAL_MAGIC = (0x377F0682, 0x377F0683)
WAL_HEADER = struct.Struct(
    ">IIIIIIII"
)  # magic, version, page size, checkpoint seq, salt1, salt2, cksum1, cksum2
FRAME_HEADER = struct.Struct(">IIII")  # page number, db size after commit (0 = not a commit), salt1, salt2
WAL_HEADER_SIZE = 32
FRAME_HEADER_SIZE = 24
SHM_HEADER = struct.Struct(
    "=IIIBBHII"
)  # iVersion, unused, iChange, isInit, bigEndCksum, szPage, mxFrame, nPage
SHM_SALT_OFFSET = 32


class WalFormatError(Exception):
    """The WAL or wal-index does not look like SQLite's: refuse rather than guess."""


@dataclass(frozen=True, slots=True)
class Generation:
    """One life of the WAL file, from a (re)start to the next, named by its two salts.

    SQLite draws a new random salt-2 (and increments salt-1) at every restart,
    and every frame carries the salts of its generation, so a frame left over
    from an older generation is never mistaken for a new one.
    """

    salt1: int
    salt2: int

    def to_json(self) -> list[int]:
        return [self.salt1, self.salt2]

    @classmethod
    def from_json(cls, value: list[int]) -> Generation:
        return cls(int(value[0]), int(value[1]))

    @classmethod
    def from_raw(cls, raw: bytes) -> Generation:
        s1, s2 = struct.unpack(">II", raw[:8])
        return cls(s1, s2)


@dataclass(frozen=True, slots=True)
class WalHeader:
    page_size: int
    generation: Generation
    raw_salts: bytes
    big_endian_checksums: bool = False  # magic 0x377f0683: frame checksums over big-endian words


@dataclass(frozen=True, slots=True)
class Frame:
    index: int  # 1-based frame number within the generation
    pgno: int
    commit_size: int  # database size in pages after this commit; 0 if not a commit frame
    data: bytes


def frame_offset(index: int, page_size: int) -> int:
    """Byte offset of frame ``index`` (1-based) in the WAL file."""
    return WAL_HEADER_SIZE + (index - 1) * (FRAME_HEADER_SIZE + page_size)


def parse_header(raw: bytes) -> WalHeader | None:
    """The WAL header, or None when the file is empty or not (yet) initialised."""
    if len(raw) < WAL_HEADER_SIZE:
        return None
    magic, version, page_size, _ckpt, salt1, salt2, _c1, _c2 = WAL_HEADER.unpack_from(raw)
    if magic not in WAL_MAGIC:
        return None
    if version != 3007000:
        raise WalFormatError(f"unknown WAL format version {version}")
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        raise WalFormatError(f"WAL header has an impossible page size {page_size}")
    return WalHeader(page_size, Generation(salt1, salt2), bytes(raw[16:24]), bool(magic & 1))


@dataclass(frozen=True, slots=True)
class ShmHeader:
    mx_frame: int
    page_size: int
    raw_salts: bytes


def read_shm_header(fd: int, attempts: int = 50) -> ShmHeader | None:
    """The wal-index header, read the way SQLite readers do: two copies must agree.

    The writer updates copy 2 then copy 1; a reader that sees them differ
    caught a commit half-way and tries again. Returns None when the index is
    not initialised (no connection has opened the WAL yet).
    """
    for _ in range(attempts):
        raw = os.pread(fd, 96, 0)
        if len(raw) < 96:
            return None
        if raw[:48] != raw[48:96]:
            continue
        _ver, _unused, _change, is_init, _big, sz, mx_frame, _npage = SHM_HEADER.unpack_from(raw)
        if not is_init:
            return None
        page_size = 65536 if sz == 1 else sz
        return ShmHeader(mx_frame, page_size, bytes(raw[SHM_SALT_OFFSET : SHM_SALT_OFFSET + 8]))
    raise WalFormatError("the wal-index header kept changing while being read")


def wal_checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data`` (a multiple of 8 bytes), continuing from (s0, s1).

    Each frame's header stores the running value over the WAL header and
    every frame before it (its first 8 header bytes, then its page): a frame
    is valid only if the chain holds, which is how SQLite's own recovery
    tells the frames of the last transactions from leftovers.
    """
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


TailEnd = Literal["stale", "eof", "overwritten", "unknown"]


class WalFile:
    """Read-only access to a ``-wal`` file and its ``-shm`` index (files may come and go)."""

    def __init__(self, db_path: Path) -> None:
        self.wal_path = Path(str(db_path) + "-wal")
        self.shm_path = Path(str(db_path) + "-shm")
        self._wal_fd: int | None = None
        self._shm_fd: int | None = None
        self._wal_ino: int | None = None

    def _fds(self) -> tuple[int, int] | None:
        try:
            ino = os.stat(self.wal_path).st_ino
        except FileNotFoundError:
            self.close()
            return None
        if self._wal_fd is None or ino != self._wal_ino:
            self.close()
            try:
                self._wal_fd = os.open(self.wal_path, os.O_RDONLY)
                self._shm_fd = os.open(self.shm_path, os.O_RDONLY)
            except FileNotFoundError:
                self.close()
                return None
            self._wal_ino = ino
        assert self._wal_fd is not None and self._shm_fd is not None
        return self._wal_fd, self._shm_fd

    def close(self) -> None:
        for fd in (self._wal_fd, self._shm_fd):
            if fd is not None:
                os.close(fd)
        self._wal_fd = self._shm_fd = self._wal_ino = None

    def state(self) -> tuple[WalHeader | None, int, Generation]:
        """(header, last committed frame, generation) now; header None while the WAL is logically empty.

        The wal-index is authoritative. After a restart it already names the
        new generation (new salts, no frame) while the file still has the old
        header, or no header at all after a TRUNCATE checkpoint: that is an
        empty WAL of the new generation. Raises :class:`WalFormatError` for
        states that only exist for an instant (the caller asks again).
        """
        fds = self._fds()
        if fds is None:
            raise WalFormatError("no WAL file (yet)")
        wal_fd, shm_fd = fds
        header = parse_header(os.pread(wal_fd, WAL_HEADER_SIZE, 0))
        shm = read_shm_header(shm_fd)
        if shm is None:
            raise WalFormatError("wal-index not initialised")
        if header is None or shm.raw_salts != header.raw_salts:
            if shm.mx_frame:
                raise WalFormatError("wal-index and WAL header disagree")
            return None, 0, Generation.from_raw(shm.raw_salts)
        if shm.page_size != header.page_size:
            raise WalFormatError(f"wal-index page size {shm.page_size} != WAL header {header.page_size}")
        return header, shm.mx_frame, header.generation

    def frames(self, header: WalHeader, first: int, last: int) -> list[Frame]:
        """Frames ``first..last`` (1-based, inclusive) of ``header``'s generation.

        Every frame must carry the generation's salts: a frame that does not
        was overwritten by a restart we have not seen yet, and reading on
        would mix two generations.
        """
        if last < first:
            return []
        fds = self._fds()
        if fds is None:
            raise WalFormatError("the WAL file disappeared while being read")
        size = FRAME_HEADER_SIZE + header.page_size
        raw = os.pread(fds[0], size * (last - first + 1), frame_offset(first, header.page_size))
        if len(raw) < size * (last - first + 1):
            raise WalFormatError(f"WAL file shorter than its committed frame {last}")
        out = []
        view = memoryview(raw)
        for i in range(last - first + 1):
            base = i * size
            pgno, commit, _s1, _s2 = FRAME_HEADER.unpack_from(raw, base)
            if raw[base + 8 : base + 16] != header.raw_salts:
                raise WalFormatError(f"frame {first + i} carries salts of another WAL generation")
            out.append(Frame(first + i, pgno, commit, bytes(view[base + FRAME_HEADER_SIZE : base + size])))
        return out

    def headers(self, header: WalHeader, first: int, last: int) -> list[tuple[int, int]]:
        """(page number, commit size) of frames ``first..last``, salts checked as in :meth:`frames`;
        the pages themselves are not copied out (a large transaction is sized before it is read)."""
        if last < first:
            return []
        fds = self._fds()
        if fds is None:
            raise WalFormatError("the WAL file disappeared while being read")
        # One 16-byte pread a frame: reading the frames whole to take their headers copied every
        # page (62 MB for a VACUUM) and took twice as long, before the first page could be sent.
        fd, salts, unpack = fds[0], header.raw_salts, FRAME_HEADER.unpack
        offset, step = frame_offset(first, header.page_size), FRAME_HEADER_SIZE + header.page_size
        out = []
        for index in range(first, last + 1):
            raw = os.pread(fd, 16, offset)
            if len(raw) < 16:
                raise WalFormatError(f"WAL file shorter than its committed frame {last}")
            if raw[8:16] != salts:
                raise WalFormatError(f"frame {index} carries salts of another WAL generation")
            pgno, commit, _s1, _s2 = unpack(raw)
            out.append((pgno, commit))
            offset += step
        return out

    def frame_header(self, header: WalHeader, index: int) -> tuple[int, int, bytes] | None:
        """(page number, commit size, raw salts) of one frame, or None past the end of the file."""
        fds = self._fds()
        if fds is None:
            return None
        raw = os.pread(fds[0], 16, frame_offset(index, header.page_size))
        if len(raw) < 16:
            return None
        pgno, commit, _s1, _s2 = FRAME_HEADER.unpack(raw)
        return pgno, commit, raw[8:16]

    def file_frames(self, page_size: int) -> int:
        """How many whole frames the WAL file has room for now (committed or not, any generation)."""
        fds = self._fds()
        if fds is None:
            return 0
        return max(0, (os.fstat(fds[0]).st_size - WAL_HEADER_SIZE) // (FRAME_HEADER_SIZE + page_size))

    def tail(self, header: WalHeader, after: int) -> tuple[list[Frame], TailEnd]:
        """The committed frames of ``header``'s generation after frame ``after``, read after a restart.

        Once the WAL has restarted, the wal-index no longer says where the old
        generation ended, but its last frames are still in the file until the
        new generation grows over them. SQLite's recovery rule finds them:
        frames carrying the generation's salts whose checksum chain (from
        frame ``after``'s stored value) holds, up to the last commit frame.
        How the scan ended says whether that is certain:

        - "stale": the next frame is older or fails the chain: the generation
          ended there, for sure;
        - "eof": the file ends there: certain only if nothing truncated it
          (``journal_size_limit``, a TRUNCATE checkpoint), which cannot be
          told afterwards;
        - "overwritten": the next frame belongs to the newer generation, which
          may have written over the end of this one;
        - "unknown": frame ``after`` itself is no longer this generation's.
        """
        fds = self._fds()
        if fds is None or after < 1:
            return [], "unknown"
        size = FRAME_HEADER_SIZE + header.page_size
        raw = os.pread(fds[0], size, frame_offset(after, header.page_size))
        if len(raw) < size or raw[8:16] != header.raw_salts:
            return [], "unknown"
        s0, s1 = struct.unpack_from(">II", raw, 16)
        committed: list[Frame] = []
        pending: list[Frame] = []
        index = after + 1
        while True:
            raw = os.pread(fds[0], size, frame_offset(index, header.page_size))
            if len(raw) < size:
                return committed, "eof"
            pgno, commit, salt1, _salt2 = FRAME_HEADER.unpack_from(raw)
            if raw[8:16] != header.raw_salts:
                newer = (salt1 - header.generation.salt1) & 0xFFFFFFFF
                return committed, "overwritten" if 0 < newer < 1 << 16 else "stale"
            s0, s1 = wal_checksum(raw[:8] + raw[FRAME_HEADER_SIZE:], s0, s1, header.big_endian_checksums)
            if (s0, s1) != struct.unpack_from(">II", raw, 16):
                return committed, "stale"
            pending.append(Frame(index, pgno, commit, bytes(raw[FRAME_HEADER_SIZE:])))
            if commit:
                committed += pending
                pending = []
            index += 1
