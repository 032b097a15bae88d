"""Snapshots of a replica kept for point-in-time restore (``hotsite replication restore --at``).

A snapshot is taken only of a verified state (the replica's file equal to
its recorded page hashes, not promoted, not damaged, nothing half-applied),
and every page is checked again while it is copied. It is written to a
hidden ``.*.tmp`` name, fsynced, and renamed to its final name, which
carries the time, the source position and the whole-database checksum;
a ``.tmp`` left by a crash or a full disk is removed before the next one
is taken and whenever the store is opened. The newest ``keep`` are kept.
Restore copies the newest snapshot taken at or before the asked time and
verifies the copy against the checksum in its name before it is renamed
to the output; a named restore point (``save``) is never pruned.
"""

from __future__ import annotations

import datetime
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import HotsiteError
from appliance.replication.checksum import page_hash
from appliance.replication.replica import Replica

_NAME = re.compile(r"^(\d+\.\d{3})_([0-9a-f]{16}_\d+|none)(?:_([0-9a-f]{16}))?\.db$")


class RestoreError(HotsiteError):
    """No snapshot fits the requested time, or the copy failed."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    path: Path
    taken_at: float
    position: str
    checksum: int | None = None  # None: taken by a version that did not record it


def parse_time(text: str) -> float:
    """Unix seconds or an ISO 8601 time (local time unless it carries an offset)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError("expected unix seconds or an ISO time such as 2026-05-01T08:00:00") from None


class SnapshotStore:
    def __init__(self, directory: Path, keep: int = 5) -> None:
        self.directory = directory
        self.keep = keep
        self.discard_leftovers()

    def discard_leftovers(self) -> None:
        """Remove temporary files a crash or a full disk left behind (never a finished snapshot)."""
        if self.directory.is_dir():
            for p in self.directory.glob("*.tmp"):
                p.unlink(missing_ok=True)
            for p in self.directory.glob(".*.tmp"):
                p.unlink(missing_ok=True)

    def list(self) -> list[Snapshot]:
        out = []
        if self.directory.is_dir():
            for p in self.directory.iterdir():
                m = _NAME.match(p.name)
                if m:
                    checksum = int(m.group(3), 16) if m.group(3) else None
                    out.append(Snapshot(p, float(m.group(1)), m.group(2).replace("_", "/"), checksum))
        return sorted(out, key=lambda s: s.taken_at)

    def take(self, replica: Replica, now: float | None = None) -> Snapshot | None:
        """A snapshot of the replica's verified state, or None (not verified now, or none kept).

        Raises :class:`ReplicaError` when the file read back differs from the
        record, ``OSError`` when the disk refuses; nothing is left behind either way.
        """
        if not replica.verified or self.keep <= 0:
            return None
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.discard_leftovers()
        now = time.time() if now is None else now
        tmp = self.directory / f".{now:.3f}.tmp"
        try:
            pos, checksum = replica.copy_verified(tmp)
            tag = f"{pos.generation.salt1:08x}{pos.generation.salt2:08x}_{pos.frame}"
            path = self.directory / f"{now:.3f}_{tag}_{checksum:016x}.db"
            os.replace(tmp, path)
            _fsync_dir(self.directory)
        finally:
            tmp.unlink(missing_ok=True)
        for old in self.list()[: -self.keep]:
            old.path.unlink(missing_ok=True)
        return Snapshot(path, now, tag.replace("_", "/"), checksum)

    def save(self, image: bytes, label: str, now: float | None = None) -> Path:
        """Keep ``image`` (a database) as a named restore point, never pruned: ``<time>_<label>.db``."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        now = time.time() if now is None else now
        path = self.directory / f"{now:.3f}_{re.sub(r'[^a-z0-9-]+', '-', label.lower())}.saved.db"
        tmp = self.directory / f".{path.name}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(image)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.directory)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def restore(self, at: float, output: Path) -> Snapshot:
        candidates = [s for s in self.list() if s.taken_at <= at]
        if not candidates:
            have = self.list()
            first = time.ctime(have[0].taken_at) if have else "none kept"
            raise RestoreError(
                f"no snapshot at or before {time.ctime(at)} in {self.directory} (oldest: {first})"
            )
        snap = candidates[-1]
        if output.exists():
            raise RestoreError(f"{output} exists; choose a new file (nothing is overwritten by restore)")
        tmp = output.with_name(f".{output.name}.tmp")
        try:
            checksum = _copy_hashing(snap.path, tmp)
            if snap.checksum is not None and checksum != snap.checksum:
                raise RestoreError(
                    f"snapshot {snap.path} is damaged: its pages hash to {checksum:016x}, recorded"
                    f" {snap.checksum:016x} when it was taken; nothing restored (try an older --at)"
                )
            os.replace(tmp, output)
        finally:
            tmp.unlink(missing_ok=True)
        return snap


def _copy_hashing(src: Path, dest: Path) -> int:
    """Copy ``src`` to ``dest`` (fsynced) and return the checksum of what was written."""
    with open(src, "rb") as f, open(dest, "wb") as out:
        header = f.read(100)
        size = int.from_bytes(header[16:18], "big") if len(header) == 100 else 0
        size = 65536 if size == 1 else size
        if size < 512:
            raise RestoreError(f"{src} is not a SQLite database (no page size in its header)")
        f.seek(0)
        checksum, pgno = 0, 0
        while chunk := f.read((1 << 20) // size * size):
            for off in range(0, len(chunk), size):
                pgno += 1
                checksum ^= page_hash(pgno, chunk[off : off + size])
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return checksum


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
