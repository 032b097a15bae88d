"""The one owner of the appliance's SQLite state.

Everything hotsite must remember across a restart lives in one database under
the state directory: the append-only audit log (who did what, when) and small
keyed state records (the failover engine's state, later). Only the daemon
opens it for writing, and only through this module.

Crash safety comes from SQLite itself: WAL journal, ``synchronous=FULL`` (an
audit record that was acknowledged survives a power cut), every write one
transaction, migrations applied in a transaction together with the schema
version, so a crash at any point leaves either the old or the new state.
The audit log is append-only, enforced by triggers, so no bug of ours can
rewrite history.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from appliance.errors import StateError
from appliance.logs import kv
from appliance.schema import MIGRATIONS as CORE

DB_NAME = "hotsite.db"
# What a store opened without a list of components has: the core's tables. The daemon passes
# every component's (appliance.migrations.COMPONENTS); the store, below the features, names none.
CORE_ONLY: Mapping[str, Sequence[str]] = {"core": CORE}
LOCK_NAME = "hotsite.lock"
FULL_DISK_BYTES = 1 << 20  # below this free, a state database that cannot be opened is a full disk
log = logging.getLogger(f"hotsite.{__name__}")


@dataclass(frozen=True, slots=True)
class Event:
    """One audit record."""

    id: int
    at: float
    kind: str
    actor: str
    subject: str
    message: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": self.at,
            "kind": self.kind,
            "actor": self.actor,
            "subject": self.subject,
            "message": self.message,
            "data": self.data,
        }


class Store:
    """The appliance's database. Open with :meth:`open`; close when done.

    ``exclusive=True`` (the daemon) also takes an advisory lock on the state
    directory, so a second daemon on the same state fails at once with a
    clear :class:`StateError` instead of two writers racing.
    """

    def __init__(self, conn: sqlite3.Connection, lock_fd: int | None, clock: Callable[[], float]):
        self._conn = conn
        self._db = sqlite_utils.Database(conn)
        self._lock_fd = lock_fd
        self._clock = clock
        self.in_memory = False  # True: a copy in memory (the state disk was full), nothing durable

    @classmethod
    def open(
        cls,
        state_dir: Path,
        *,
        exclusive: bool = True,
        clock: Callable[[], float] = time.time,
        components: Mapping[str, Sequence[str]] = CORE_ONLY,
    ) -> Store:
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as exc:
            raise StateError(f"state directory {state_dir} cannot be created: {exc.strerror}") from None
        lock_fd = _lock(state_dir) if exclusive else None
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                state_dir / DB_NAME, isolation_level=None, timeout=5.0, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            store = cls(conn, lock_fd, clock)
            store._migrate(components)
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            if lock_fd is not None:
                os.close(lock_fd)
            raise StateError(f"state database {state_dir / DB_NAME} is unusable: {exc}") from None
        return store

    @classmethod
    def open_or_in_memory(
        cls,
        state_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        components: Mapping[str, Sequence[str]] = CORE_ONLY,
    ) -> Store:
        """:meth:`open`; on a full disk (less than ``FULL_DISK_BYTES`` free) :meth:`open_in_memory_copy`."""
        try:
            return cls.open(state_dir, clock=clock, components=components)
        except StateError as exc:
            try:
                free = shutil.disk_usage(state_dir).free
            except OSError:
                raise exc from None
            if free >= FULL_DISK_BYTES:
                raise
            log.error(
                "state disk full: running on a copy of the state in memory, nothing recorded durably",
                extra=kv(state_dir=state_dir, error=str(exc)),
            )
            return cls.open_in_memory_copy(state_dir, clock=clock, components=components)

    @classmethod
    def open_in_memory_copy(
        cls,
        state_dir: Path,
        *,
        clock: Callable[[], float] = time.time,
        components: Mapping[str, Sequence[str]] = CORE_ONLY,
    ) -> Store:
        """The state database copied into memory, for a daemon whose state disk is full.

        A WAL database cannot even be opened for reading when its ``-shm``
        cannot be created, so the daemon would not start at all; with this it
        starts degraded instead: it reads the last recorded state (read-only,
        or ``immutable`` when even that fails, which misses a ``-wal`` left by
        a crash) and records nothing durably until it is restarted with space.
        ``in_memory`` says so (status, an incident).
        """
        lock_fd = _lock(state_dir)
        mem = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        path = state_dir / DB_NAME
        for mode in ("ro", "ro&immutable=1"):
            if not path.exists():
                break
            try:
                src = sqlite3.connect(f"file:{path}?mode={mode}", uri=True)
                try:
                    src.backup(mem)
                finally:
                    src.close()
                break
            except sqlite3.DatabaseError:
                continue
        store = cls(mem, lock_fd, clock)
        store.in_memory = True
        store._migrate(components)
        return store

    def close(self) -> None:
        self._conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def schema_version(self, component: str = "core") -> int:
        row = self._conn.execute(
            "SELECT version FROM schema_versions WHERE component = ?", (component,)
        ).fetchone()
        return int(row[0]) if row else 0

    def _migrate(self, components: Mapping[str, Sequence[str]]) -> None:
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_versions"
            " (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        for component, migrations in components.items():
            current = self.schema_version(component)
            if current > len(migrations):
                raise StateError(
                    f"state database has {component} schema version {current}, newer than this"
                    f" hotsite ({len(migrations)}): refusing to run an older release on it"
                )
            for version, script in enumerate(migrations[current:], start=current + 1):
                with self.transaction() as conn:
                    for statement in _statements(script):
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_versions (component, version) VALUES (?, ?)"
                        " ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                        (component, version),
                    )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): all of it commits, or none of it.

        Components that keep their own tables (registered in
        ``appliance.migrations``) write through this, so every write in the
        appliance goes through the one connection this store owns.
        """
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Rows of a read-only query, as ``sqlite3.Row`` (index by column name)."""
        cursor = self._conn.execute(sql, params)
        cursor.row_factory = sqlite3.Row
        return cursor.fetchall()

    # -- audit log ---------------------------------------------------------

    def record(
        self,
        kind: str,
        *,
        actor: str = "daemon",
        subject: str = "",
        message: str = "",
        data: dict[str, Any] | None = None,
    ) -> Event:
        """Append one event to the audit log and return it (durable on return)."""
        row = {
            "at": self._clock(),
            "kind": kind,
            "actor": actor,
            "subject": subject,
            "message": message,
            "data": json.dumps(data or {}, sort_keys=True, default=str),
        }
        with self.transaction():
            table = self._db.table("events")
            table.insert(row)
            event_id = table.last_rowid
        assert event_id is not None
        return Event(id=event_id, **{**row, "data": data or {}})  # type: ignore[arg-type]

    def events(
        self,
        *,
        limit: int = 20,
        kind: str | None = None,
        since: float | None = None,
        subject: str | None = None,
    ) -> list[Event]:
        """The newest events first, optionally filtered by kind prefix, time and subject."""
        clauses: list[str] = []
        args: list[str | float] = []
        if kind:
            clauses.append("(kind = ? OR kind LIKE ?)")
            args += [kind, kind + ".%"]
        if since is not None:
            clauses.append("at >= ?")
            args.append(since)
        if subject:
            clauses.append("subject = ?")
            args.append(subject)
        rows = self._db.table("events").rows_where(
            " AND ".join(clauses) or None, args, order_by="id DESC", limit=limit
        )
        return [_event(row) for row in rows]

    # -- keyed state ---------------------------------------------------------

    def put_state(self, key: str, value: Any) -> None:
        with self.transaction():
            self._db.table("state").upsert(
                {"key": key, "value": json.dumps(value, sort_keys=True), "updated_at": self._clock()},
                pk="key",
            )

    def get_state(self, key: str, default: Any = None) -> Any:
        row = self._conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default


def _event(row: dict[str, Any]) -> Event:
    return Event(
        id=row["id"],
        at=row["at"],
        kind=row["kind"],
        actor=row["actor"],
        subject=row["subject"],
        message=row["message"],
        data=json.loads(row["data"]),
    )


def _statements(script: str) -> list[str]:
    """Split a migration into statements (``executescript`` would commit on its own).

    Splits at every ``;`` that ends a complete statement, as SQLite judges it,
    so semicolons inside strings and trigger bodies stay where they are.
    """
    statements, buffer = [], ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if buffer.strip(" \n\t;"):
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip(" \n\t;"):
        raise ValueError(f"incomplete SQL statement in migration: {buffer.strip()[:60]!r}")
    return statements


def _lock(state_dir: Path) -> int:
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateError(
            f"another hotsite daemon (pid {holder}) is already using the state directory {state_dir}"
        ) from None
    with contextlib.suppress(OSError):  # who holds it, for the message above; a full disk must not stop us
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
