"""Replication's tables in the appliance state DB (registered in ``appliance.migrations``)."""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: positions seen and snapshots kept, for status after a restart and for the record.
    """
    CREATE TABLE replication_positions (
        stream      TEXT PRIMARY KEY,
        position    TEXT,
        checksum    TEXT,
        observed_at REAL,
        applied_at  REAL,
        updated_at  REAL NOT NULL
    );
    CREATE TABLE replication_snapshots (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        stream    TEXT NOT NULL,
        path      TEXT NOT NULL,
        position  TEXT,
        taken_at  REAL NOT NULL
    );
    CREATE INDEX replication_snapshots_stream ON replication_snapshots(stream, taken_at);
    """,
]
