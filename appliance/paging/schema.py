"""The paging component's tables (registered in ``appliance.migrations``; append, never edit)."""

from __future__ import annotations

MIGRATIONS: list[str] = [
    # 1: escalation state, incident history, outbox.
    """
    CREATE TABLE paging_state (
        id         INTEGER PRIMARY KEY CHECK (id = 1),
        state      TEXT NOT NULL,          -- PagerState.to_json()
        updated_at REAL NOT NULL
    );
    CREATE TABLE paging_incidents (
        id          INTEGER PRIMARY KEY,   -- the number people text back: ACK 42
        grp         TEXT NOT NULL,
        severity    TEXT NOT NULL,
        summary     TEXT NOT NULL,
        status      TEXT NOT NULL,         -- open | acked | resolved
        opened_at   REAL NOT NULL,
        acked_at    REAL,
        acked_by    TEXT,
        resolved_at REAL,
        resolved_by TEXT,
        data        TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE paging_outbox (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        dedup       TEXT NOT NULL UNIQUE,  -- one row per page ever decided
        incident_id INTEGER,
        contact     TEXT NOT NULL,
        kind        TEXT NOT NULL,         -- trigger | resolve | reply
        text        TEXT NOT NULL,
        reason      TEXT NOT NULL,
        channels    TEXT NOT NULL DEFAULT '[]',
        state       TEXT NOT NULL,         -- queued | sending | sent | uncertain | failed | cancelled
        attempts    INTEGER NOT NULL DEFAULT 0,
        created_at  REAL NOT NULL,
        next_at     REAL NOT NULL,
        sent_at     REAL,
        channel     TEXT,
        reference   TEXT,
        detail      TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX paging_outbox_due ON paging_outbox(state, next_at);
    CREATE INDEX paging_outbox_contact ON paging_outbox(contact, kind, sent_at);
    """,
    # 2: the send state machine (PAGING.md): the last point each send reached, so a restart
    # resends every page that certainly never went out and marks only the rest uncertain.
    """
    ALTER TABLE paging_outbox ADD COLUMN phase TEXT NOT NULL DEFAULT '';
    ALTER TABLE paging_outbox ADD COLUMN phase_channel TEXT;
    ALTER TABLE paging_outbox ADD COLUMN parts_sent INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE paging_outbox ADD COLUMN parts_total INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE paging_outbox ADD COLUMN uncertain_on TEXT NOT NULL DEFAULT '';
    ALTER TABLE paging_outbox ADD COLUMN repeat_of INTEGER;
    ALTER TABLE paging_outbox ADD COLUMN severity TEXT NOT NULL DEFAULT 'error';
    """,
]
