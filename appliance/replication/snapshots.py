"""Snapshots of a replica kept for point-in-time restore (``hotsite replication restore --at``).

A snapshot is a consistent copy of the replica file (taken under the
replica's lock, so it is a committed source state), named by the time it
was taken and the position it holds. The newest ``keep`` are kept.
Restore copies the newest snapshot taken at or before the asked time.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import HotsiteError
from appliance.replication.replica import Replica

_NAME = re.compile(r"^(\d+\.\d{3})_([0-9a-f]{16}_\d+|none)\.db$")


class RestoreError(HotsiteError):
    """No snapshot fits the requested time, or the copy failed."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    path: Path
    taken_at: float
    position: str


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

    def list(self) -> list[Snapshot]:
        out = []
        if self.directory.is_dir():
            for p in self.directory.iterdir():
                m = _NAME.match(p.name)
                if m:
                    out.append(Snapshot(p, float(m.group(1)), m.group(2).replace("_", "/")))
        return sorted(out, key=lambda s: s.taken_at)

    def take(self, replica: Replica, now: float | None = None) -> Snapshot | None:
        if replica.position is None or self.keep <= 0:
            return None
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        now = time.time() if now is None else now
        pos = replica.position
        tag = f"{pos.generation.salt1:08x}{pos.generation.salt2:08x}_{pos.frame}"
        path = self.directory / f"{now:.3f}_{tag}.db"
        replica.copy_to(path)
        for old in self.list()[: -self.keep]:
            old.path.unlink(missing_ok=True)
        return Snapshot(path, now, tag.replace("_", "/"))

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
        tmp = output.with_name(output.name + ".tmp")
        shutil.copyfile(snap.path, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, output)
        return snap
