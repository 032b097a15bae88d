"""The source agent's own small config file (``/etc/hotsite/source.toml`` at the primary).

Separate from the appliance's ``hotsite.toml`` because it runs on another
machine with other files; validated with the same rules (unknown keys are
errors, secrets only as ``*_file`` paths).

The agent is read-only towards the data it serves. Its only writes to a
SQLite database are its read mark in the wal-index (as any reader writes
one) and, when the application does not restart the WAL itself, a
checkpoint, which copies committed pages from the WAL into the database
file and changes no data (what any reader of that database sees stays the
same); it keeps the WAL from growing without bound under a steady write
load. Keys of ``[source]``:

- ``listen``, ``tls_cert_file``, ``tls_key_file``, ``tls_ca_file``,
  ``allowed_clients``: where and to whom it serves (mutual TLS).
- ``poll_interval_s`` (0.01): how often a WAL is read for new commits.
- ``heartbeat_s`` (0.5): the longest silence on an idle stream.
- ``rescan_s`` (30): full re-hash of a file tree; between rescans changes are
  seen through inotify (``watch = false``: stat comparison every
  ``poll_interval_s``, at least 0.2 s).
- ``watch`` (true): use inotify for file trees.
- ``bandwidth_limit_bytes_s`` (0 = unlimited).
- ``restart_frames`` (1000): once the WAL holds this many frames and
  everything in it has been read, the agent lets go of it for up to 50 ms so
  the application's own auto-checkpoint restarts it, as it would without
  replication (see ``appliance/replication/follower.py``). Set it to the
  application's ``wal_autocheckpoint`` (SQLite's default is 1000). 0: never.
- ``checkpoint_frames`` (2000): once the WAL holds this many frames anyway
  (the application checkpoints rarely, writes slowly, or the WAL file is
  still too short for the above), the agent restarts it itself: it copies
  what it has read, then holds the application's writers off for the copy
  of the frames committed since (about 1 ms measured flat out). 0: never
  (the agent then never opens the database for writing).
- ``peer_timeout_s`` (15): a replica that sends keepalives and is not heard
  from for this long is presumed cut off (a partition drops packets and
  closes nothing); its session ends and lets go of its guard on the WAL.
- ``max_hello_bytes`` (16 MiB): the largest HELLO a replica may send, once
  inflated: 8 bytes of page hash per page of its copy (16 MiB: a database of
  2 million pages, 8 GiB at 4 KiB pages) or its list of file contents. A
  larger one is refused (logged) before it is inflated any further; raise it
  for a larger database. It bounds what one session can make the agent
  allocate (twice this, transiently).
- ``peer_timeout_s`` also ends a session whose replica takes nothing we send
  for that long (it keeps the socket open but does not read): its guard on the
  WAL is let go, so a stuck backup cannot grow the primary's WAL.
- ``checkpoint_busy_ms`` (50): the RESTART checkpoint's busy timeout, which
  bounds how long the application's writers can wait for it (plus the copy
  of the few frames committed since the PASSIVE one). The application needs
  a busy timeout of its own larger than this (SQLite's Python default is
  5 s), as it does for its own checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from appliance import tomlfile
from appliance.fields import ListenAddress, Name, Section


class SourceStream(Section):
    kind: Literal["sqlite", "files"]
    path: Path
    exclude: list[str] = []  # glob patterns (files streams), e.g. "*.swp"


class SourceAgentSection(Section):
    listen: ListenAddress = "0.0.0.0:7450"
    tls_cert_file: Path
    tls_key_file: Path
    tls_ca_file: Path
    allowed_clients: list[str] = []  # client certificate names (CN or DNS SAN); empty: any the CA signed
    poll_interval_s: float = Field(default=0.01, gt=0, le=5)
    heartbeat_s: float = Field(default=0.5, gt=0, le=60)
    rescan_s: float = Field(default=30.0, gt=0, le=86400)
    watch: bool = True
    bandwidth_limit_bytes_s: int = Field(default=0, ge=0)
    checkpoint_frames: int = Field(default=2000, ge=0, le=10_000_000)
    restart_frames: int = Field(default=1000, ge=0, le=10_000_000)
    checkpoint_busy_ms: int = Field(default=50, ge=1, le=5000)
    peer_timeout_s: float = Field(default=15.0, gt=0, le=3600)
    max_hello_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024, le=1024 * 1024 * 1024)


class SourceConfig(Section):
    source: SourceAgentSection
    streams: dict[Name, SourceStream]


def load_source_config(path: Path) -> SourceConfig:
    """The source agent's TOML, read and described like the appliance's own config."""
    return tomlfile.validate(SourceConfig, tomlfile.read(path, "source agent config"), str(path))


def served_path_problems(config: SourceConfig) -> list[str]:
    """What ``hotsite source --check`` refuses in the served paths, one line each, naming the key.

    A SQLite stream must be a SQLite database in WAL mode: the agent follows
    the WAL, and a rollback-journal database would only fail later, at the
    first session, far from whoever set it up.
    """
    problems = []
    for name, stream in config.streams.items():
        key = f"streams.{name}.path"
        if not stream.path.exists():
            problems.append(f"{key}: {stream.path} does not exist")
        elif stream.kind == "sqlite":
            problem = _sqlite_problem(stream.path)
            if problem:
                problems.append(f"{key}: {stream.path}: {problem}")
        elif not stream.path.is_dir():
            problems.append(f"{key}: {stream.path} is not a directory (a files stream serves a directory)")
    return problems


def _sqlite_problem(path: Path) -> str | None:
    """None for a SQLite database in WAL mode; else what is wrong (read from its 100-byte header)."""
    try:
        with open(path, "rb") as f:
            header = f.read(100)
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
        return "is not a SQLite database (expected the header 'SQLite format 3')"
    if header[18] != 2 or header[19] != 2:
        mode = "delete/truncate/persist (a rollback journal)" if header[18] == 1 else f"version {header[18]}"
        return (
            f"is not in WAL mode (journal mode {mode}); the agent follows the WAL: run"
            " 'PRAGMA journal_mode=WAL' on it once (the application keeps that mode)"
        )
    return None
