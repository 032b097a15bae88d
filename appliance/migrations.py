"""The schema of every component that keeps state in the appliance's database.

Each component owns a list of migrations, applied in order, each in one
transaction together with the component's version in ``schema_versions``.
Components version independently, so two features can grow their tables
without renumbering each other's migrations. Never edit a released
migration: append a new one.
"""

from __future__ import annotations

from appliance.paging.schema import MIGRATIONS as PAGING
from appliance.replication.schema import MIGRATIONS as REPLICATION

CORE: list[str] = [
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

# component name -> its migrations. Register a new component with one line here.
COMPONENTS: dict[str, list[str]] = {
    "core": CORE,
    "paging": PAGING,
    "replication": REPLICATION,
}
