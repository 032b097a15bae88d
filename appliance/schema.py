"""The core's own tables in the appliance's database: the audit log and keyed state.

Base layer, beside :mod:`appliance.store` (which opens a store with these
alone unless told otherwise); each feature keeps its tables in its own
``schema.py`` (``appliance/paging/schema.py``, ``appliance/replication/schema.py``)
and the top's :mod:`appliance.migrations` lists them all for the daemon.
Never edit a released migration: append a new one.
"""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: audit log and keyed state.
    """
    CREATE TABLE events (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        at      REAL    NOT NULL,          -- unix time, seconds
        kind    TEXT    NOT NULL,          -- e.g. daemon.start, probe.state, operator.note
        actor   TEXT    NOT NULL,          -- 'daemon', 'uid=0(root)', 'sms:+86…'
        subject TEXT    NOT NULL DEFAULT '',
        message TEXT    NOT NULL DEFAULT '',
        data    TEXT    NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_at ON events(at);
    CREATE INDEX events_kind ON events(kind, at);
    CREATE TRIGGER events_no_update BEFORE UPDATE ON events
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER events_no_delete BEFORE DELETE ON events
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TABLE state (
        key        TEXT PRIMARY KEY,
        value      TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
]
