"""The durable outbox: every page is written to the state DB before it is sent, and marked after.

Why: a page decided and then lost in a crash is the failure that matters
most (gammu #131). So the escalation core's decision, the incident's new
state and the pages it asked for are committed in ONE transaction; a sender
then claims a row (``queued`` -> ``sending``), sends it, and records the
outcome (``sent``, ``uncertain``, back to ``queued`` with a backoff, or
``failed`` after the last attempt).

Exactly once: a row is claimed by a conditional UPDATE, so two senders never
take the same row; a row found in ``sending`` at start-up (the daemon died
mid-send) may have gone out and is marked ``uncertain``, never resent. One bad
row never blocks the others (gammu #462): rows are independent.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from appliance.paging.channel import Delivery
from appliance.store import Store


@dataclass(frozen=True, slots=True)
class Row:
    id: int
    dedup: str
    incident_id: int | None
    contact: str
    kind: str
    text: str
    reason: str
    channels: tuple[str, ...]
    state: str
    attempts: int
    created_at: float
    next_at: float

    @classmethod
    def of(cls, row: sqlite3.Row) -> Row:
        return cls(
            row["id"],
            row["dedup"],
            row["incident_id"],
            row["contact"],
            row["kind"],
            row["text"],
            row["reason"],
            tuple(json.loads(row["channels"])),
            row["state"],
            row["attempts"],
            row["created_at"],
            row["next_at"],
        )


class Outbox:
    def __init__(self, store: Store) -> None:
        self.store = store

    # -- writes inside the caller's transaction -------------------------------------

    @staticmethod
    def enqueue(
        conn: sqlite3.Connection,
        *,
        dedup: str,
        incident_id: int | None,
        contact: str,
        kind: str,
        text: str,
        reason: str,
        channels: Sequence[str],
        now: float,
    ) -> bool:
        """Queue one page; False if this exact page (``dedup``) was queued before."""
        cursor = conn.execute(
            "INSERT OR IGNORE INTO paging_outbox (dedup, incident_id, contact, kind, text, reason, channels,"
            " state, created_at, next_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?)",
            (dedup, incident_id, contact, kind, text, reason, json.dumps(list(channels)), now, now),
        )
        return cursor.rowcount == 1

    @staticmethod
    def cancel_triggers(conn: sqlite3.Connection, incident_id: int, why: str) -> int:
        """Queued trigger pages of an acknowledged or resolved incident are never sent."""
        return conn.execute(
            "UPDATE paging_outbox SET state = 'cancelled', detail = ? WHERE incident_id = ?"
            " AND kind = 'trigger' AND state = 'queued'",
            (why, incident_id),
        ).rowcount

    # -- the sender's side ---------------------------------------------------------

    def recover(self) -> int:
        """At start-up: rows left in ``sending`` may have gone out; mark them uncertain."""
        with self.store.transaction() as conn:
            return conn.execute(
                "UPDATE paging_outbox SET state = 'uncertain',"
                " detail = 'the daemon stopped while sending: may have gone out, not resent'"
                " WHERE state = 'sending'"
            ).rowcount

    def due(self, now: float, limit: int = 50) -> list[Row]:
        rows = self.store.query(
            "SELECT * FROM paging_outbox WHERE state = 'queued' AND next_at <= ?"
            " ORDER BY next_at, id LIMIT ?",
            (now, limit),
        )
        return [Row.of(r) for r in rows]

    def next_due(self) -> float | None:
        rows = self.store.query("SELECT MIN(next_at) AS t FROM paging_outbox WHERE state = 'queued'")
        return rows[0]["t"] if rows and rows[0]["t"] is not None else None

    def claim(self, row_id: int, now: float) -> bool:
        with self.store.transaction() as conn:
            return (
                conn.execute(
                    "UPDATE paging_outbox SET state = 'sending', attempts = attempts + 1, next_at = ?"
                    " WHERE id = ? AND state = 'queued'",
                    (now, row_id),
                ).rowcount
                == 1
            )

    def defer(self, row_id: int, until: float, why: str) -> None:
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE paging_outbox SET next_at = ?, detail = ? WHERE id = ? AND state = 'queued'",
                (until, why, row_id),
            )

    def finish(
        self,
        row: Row,
        delivery: Delivery,
        channel: str,
        tried: list[str],
        now: float,
        *,
        max_attempts: int,
        backoff_s: float,
    ) -> str:
        """Record the outcome; returns the row's new state."""
        detail = "; ".join(tried) or delivery.detail
        if delivery.result == "sent":
            state, next_at = "sent", now
        elif delivery.result == "uncertain":
            state, next_at = "uncertain", now
        elif delivery.retryable and row.attempts + 1 < max_attempts:
            state, next_at = "queued", now + min(backoff_s * 2**row.attempts, 3600.0)
        else:
            state, next_at = "failed", now
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE paging_outbox SET state = ?, next_at = ?, sent_at = ?, channel = ?, reference = ?,"
                " detail = ? WHERE id = ?",
                (
                    state,
                    next_at,
                    now if state in ("sent", "uncertain") else None,
                    channel or None,
                    delivery.reference,
                    detail[:1000],
                    row.id,
                ),
            )
        return state

    def allowed_at(self, contact: str, now: float, per_hour: int) -> float | None:
        """None if ``contact`` may get another trigger page now, else when they may."""
        rows = self.store.query(
            "SELECT COALESCE(sent_at, next_at) AS t FROM paging_outbox WHERE contact = ? AND kind = 'trigger'"
            " AND ((state IN ('sent', 'uncertain') AND sent_at > ?) OR state = 'sending')"
            " ORDER BY t DESC LIMIT ?",
            (contact, now - 3600.0, per_hour),
        )
        if len(rows) < per_hour:
            return None
        return float(rows[-1]["t"]) + 3600.0

    def depth(self) -> int:
        return int(
            self.store.query("SELECT COUNT(*) AS n FROM paging_outbox WHERE state IN ('queued', 'sending')")[
                0
            ]["n"]
        )

    def rows(self, *, incident_id: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
        sql = "SELECT * FROM paging_outbox"
        params: list[Any] = []
        if incident_id is not None:
            sql += " WHERE incident_id = ?"
            params.append(incident_id)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        return [dict(r) for r in self.store.query(sql, params)]

    def mark_delivered(self, channel: str, reference: int, delivered: bool, status: int) -> int:
        """Pair a delivery report with the page whose ``+CMGS`` reference it names (newest first)."""
        rows = self.store.query(
            "SELECT id, reference, detail FROM paging_outbox WHERE channel = ? AND reference IS NOT NULL"
            " AND state IN ('sent', 'uncertain') ORDER BY id DESC LIMIT 200",
            (channel,),
        )
        for row in rows:
            if str(reference) in str(row["reference"]).split(","):
                outcome = "delivered" if delivered else f"not delivered (status {status:#04x})"
                note = f"delivery report: {outcome}"
                with self.store.transaction() as conn:
                    conn.execute(
                        "UPDATE paging_outbox SET detail = ? WHERE id = ?",
                        ((row["detail"] + "; " + note)[:1000], row["id"]),
                    )
                return int(row["id"])
        return 0
