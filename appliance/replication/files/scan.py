"""The source's view of a tree: stat-keyed content hashes, and reads that notice a file changing."""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from appliance.replication.files.delta import BLOCK, READ_CHUNK, BlockHasher

log = logging.getLogger("hotsite.appliance.replication.files")


@dataclass(frozen=True, slots=True)
class Entry:
    sha256: str
    mode: int
    size: int


@dataclass(frozen=True, slots=True)
class Digest:
    """A file's SHA-256 (and block hashes, if asked), read a chunk at a time, and the stat key it had."""

    sha256: str
    size: int
    key: tuple[int, int, int]
    blocks: list[str] | None = None


def digest_stable(path: Path, blocks: bool = False) -> Digest | None:
    """The file's hashes, only if its size, mtime and inode did not change while reading it."""
    hasher = hashlib.sha256()
    block_hasher = BlockHasher() if blocks else None
    size = 0
    try:
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            while chunk := f.read(READ_CHUNK):
                hasher.update(chunk)
                size += len(chunk)
                if block_hasher is not None:
                    block_hasher.update(chunk)
        after = os.stat(path)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return None
    key = (before.st_size, before.st_mtime_ns, before.st_ino)
    if (after.st_size, after.st_mtime_ns, after.st_ino) != key or size != before.st_size:
        return None
    return Digest(hasher.hexdigest(), size, key, block_hasher.result() if block_hasher else None)


class TreeScanner:
    """Manifest of a directory tree, re-hashing only files whose stat changed (or all, on rescan)."""

    def __init__(self, root: Path, exclude: tuple[str, ...] = ()) -> None:
        self.root = root
        self.exclude = exclude
        self._cache: dict[str, tuple[tuple[int, int, int], Entry]] = {}
        self.scans = 0
        self.full_scans = 0

    def scan(self, full: bool = False) -> dict[str, Entry]:
        self.scans += 1
        self.full_scans += full
        manifest: dict[str, Entry] = {}
        seen: dict[str, tuple[tuple[int, int, int], Entry]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".hotsite"))
            for name in sorted(filenames):
                if name.startswith(".hotsite"):  # ours (a replica's temporary files); never shipped
                    continue
                full_path = Path(dirpath) / name
                rel = str(full_path.relative_to(self.root))
                if any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(name, pat) for pat in self.exclude):
                    continue
                try:
                    st = full_path.lstat()
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                key = (st.st_size, st.st_mtime_ns, st.st_ino)
                cached = self._cache.get(rel)
                if cached is not None and cached[0] == key and not full:
                    entry = cached[1]
                else:
                    digest = digest_stable(full_path)
                    if digest is None:
                        continue  # changed while being read: next scan
                    key = digest.key
                    entry = Entry(digest.sha256, stat.S_IMODE(st.st_mode), digest.size)
                manifest[rel] = entry
                seen[rel] = (key, entry)
        self._cache = seen
        return manifest

    def forget(self, rel: str) -> None:
        """Hash ``rel`` again next scan: its scanned hash proved not to be its content (a scan that
        read it mid-write, within one mtime tick, keeps a stat key that would otherwise hide it)."""
        self._cache.pop(rel, None)

    def read(self, rel: str, sha256: str) -> bytes | None:
        got = read_stable(self.root / rel)
        if got is None or hashlib.sha256(got[0]).hexdigest() != sha256:
            return None
        return got[0]


def read_stable(path: Path) -> tuple[bytes, tuple[int, int, int]] | None:
    """The file's bytes, only if its size, mtime and inode did not change while reading it."""
    try:
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            data = f.read()
        after = os.stat(path)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return None
    key = (before.st_size, before.st_mtime_ns, before.st_ino)
    if (after.st_size, after.st_mtime_ns, after.st_ino) != key or len(data) != before.st_size:
        return None
    return data, key


def read_blocks(path: Path, indices: list[int], key: tuple[int, int, int]) -> bytes | None:
    """The given ``BLOCK``s of the file, only if it is still the version with stat ``key``."""
    try:
        with open(path, "rb") as f:
            fd = f.fileno()
            if _stat_key(os.fstat(fd)) != key:
                return None
            body = b"".join(os.pread(fd, BLOCK, i * BLOCK) for i in indices)
            if _stat_key(os.fstat(fd)) != key:
                return None
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return None
    return body


def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class ChunkedRead:
    """One pass over a file sent in parts: hashes what it hands out, and says whether that is the
    scanned version (by SHA-256, the final word; a size or mtime change ends it early)."""

    def __init__(self, path: Path, blocks: bool) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - a long read, closed by close()
        self._before = os.fstat(self._file.fileno())
        self._hasher = hashlib.sha256()
        self._blocks = BlockHasher() if blocks else None
        self.offset = 0

    def read(self, n: int) -> bytes:
        data = self._file.read(n)
        self._hasher.update(data)
        if self._blocks is not None:
            self._blocks.update(data)
        self.offset += len(data)
        return data

    def held(self) -> bool:
        """False once the file's size or mtime moved since it was opened (a write under us)."""
        now = os.fstat(self._file.fileno())
        return (now.st_size, now.st_mtime_ns) == (self._before.st_size, self._before.st_mtime_ns)

    def intact(self, sha256: str, size: int) -> bool:
        return self.held() and self.offset == size and self._hasher.hexdigest() == sha256

    def blocks(self) -> list[str]:
        return self._blocks.result() if self._blocks is not None else []

    def close(self) -> None:
        self._file.close()
