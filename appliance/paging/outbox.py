"""The durable outbox: every page is written to the state DB before it is sent, and marked after.

Why: a page decided and then lost in a crash is the failure that matters
most (gammu #131). So the escalation core's decision, the incident's new
state and the pages it asked for are committed in ONE transaction; a sender
then claims a row (``queued`` -> ``sending``), sends it, and records the
outcome (``sent``, ``uncertain``, back to ``queued`` with a backoff, or
``failed`` after the last attempt). A page a rate limit holds is ``held``
(with the time it may go), never silently queued.

The send state machine (``PAGING.md``): while a row is ``sending`` the
channel reports each step *before* it takes it (``phase``: claimed, handed,
command, prompt, pdu, answered, error; ``parts_sent`` of ``parts_total``).
At start-up (:meth:`Outbox.recover`) a row whose PDU may have been written
without a final answer is *uncertain*; every other unfinished row certainly
never went out and is resent. At least once beats at most once for people:
an uncertain page is sent again on the next channel at once and, marked
``(repeat)``, on the channel that was uncertain (:meth:`Outbox.follow_up`).

Rows are independent (gammu #462): one bad row never blocks the others, and
a row is claimed by a conditional UPDATE, so two senders never take it both.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.paging.channel import Delivery
from appliance.store import Store

REPEAT_MARK = "(repeat) "
UNCERTAIN_PHASES = ("pdu", "handed")  # the far end may have it, and said nothing yet


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
    severity: str = "error"
    repeat_of: int | None = None
    phase: str = ""
    phase_channel: str | None = None
    parts_sent: int = 0
    parts_total: int = 0
    detail: str = ""

    @property
    def may_have_gone_out(self) -> bool:
        """The recovery rule: the PDU (or a part of the page) may have reached the far end."""
        return (
            self.phase in UNCERTAIN_PHASES
            or 0 < self.parts_sent < max(self.parts_total, 1)
            or (self.parts_total == 0 and self.parts_sent > 0)
        )

    @property
    def answered_in_full(self) -> bool:
        """Every part had its +CMGS before the daemon stopped: it went out, only unrecorded."""
        return self.parts_total > 0 and self.parts_sent == self.parts_total

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
            row["severity"],
            row["repeat_of"],
            row["phase"],
            row["phase_channel"],
            row["parts_sent"],
            row["parts_total"],
            row["detail"],
        )


@dataclass
class Recovery:
    """What :meth:`Outbox.recover` found: row ids resent, rows uncertain, rows found sent."""

    resent: list[int] = field(default_factory=list)
    uncertain: list[Row] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)


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
        severity: str = "error",
        repeat_of: int | None = None,
    ) -> bool:
        """Queue one page; False if this exact page (``dedup``) was queued before."""
        cursor = conn.execute(
            "INSERT OR IGNORE INTO paging_outbox (dedup, incident_id, contact, kind, text, reason, channels,"
            " state, created_at, next_at, severity, repeat_of)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
            (
                dedup,
                incident_id,
                contact,
                kind,
                text,
                reason,
                json.dumps(list(channels)),
                now,
                now,
                severity,
                repeat_of,
            ),
        )
        return cursor.rowcount == 1

    @classmethod
    def follow_up(
        cls,
        conn: sqlite3.Connection,
        row: Row,
        uncertain_on: Sequence[str],
        others: Sequence[str],
        now: float,
        *,
        delivered_elsewhere: bool = False,
    ) -> list[str]:
        """An uncertain page, sent again: on ``others`` (the next channels) at once, unless one
        of them already took it, and on each channel in ``uncertain_on`` marked ``(repeat)``.

        Only once per page: a repeat that is itself uncertain is not repeated again (the
        contractor may already have it twice). Returns the dedup keys queued.
        """
        if row.repeat_of is not None:
            return []
        queued: list[str] = []
        for channels, dedup, text, reason in cls._follow_ups(row, uncertain_on, others, delivered_elsewhere):
            if cls.enqueue(
                conn,
                dedup=dedup,
                incident_id=row.incident_id,
                contact=row.contact,
                kind=row.kind,
                text=text,
                reason=reason,
                channels=channels,
                now=now,
                severity=row.severity,
                repeat_of=row.id,
            ):
                queued.append(dedup)
        return queued

    @staticmethod
    def _follow_ups(
        row: Row, uncertain_on: Sequence[str], others: Sequence[str], delivered_elsewhere: bool
    ) -> list[tuple[list[str], str, str, str]]:
        """(channels, dedup, text, reason) of each follow-up page of an uncertain one."""
        out: list[tuple[list[str], str, str, str]] = []
        if others and not delivered_elsewhere:
            why = f"{row.reason}; page {row.id} was uncertain on {', '.join(uncertain_on)}"
            out.append((list(others), f"{row.dedup}:next", row.text, why))
        for channel in uncertain_on:
            text = row.text if row.text.startswith(REPEAT_MARK) else REPEAT_MARK + row.text
            why = f"{row.reason}; page {row.id} may have gone out on {channel}: sent again, marked (repeat)"
            out.append(([channel], f"{row.dedup}:repeat:{channel}", text, why))
        return out

    @staticmethod
    def cancel_triggers(conn: sqlite3.Connection, incident_id: int, why: str) -> int:
        """Queued trigger pages of an acknowledged or resolved incident are never sent."""
        return conn.execute(
            "UPDATE paging_outbox SET state = 'cancelled', detail = ? WHERE incident_id = ?"
            " AND kind = 'trigger' AND state IN ('queued', 'held')",
            (why, incident_id),
        ).rowcount

    # -- the sender's side ---------------------------------------------------------

    def recover(self, now: float) -> Recovery:
        """At start-up, each row left in ``sending`` by a daemon that stopped: the rule of PAGING.md.

        Answered in full -> ``sent``; PDU (or a part) possibly out -> ``uncertain`` (the caller
        queues its follow-ups); anything earlier certainly never left -> ``queued`` now.
        """
        found = Recovery()
        rows = [Row.of(r) for r in self.store.query("SELECT * FROM paging_outbox WHERE state = 'sending'")]
        with self.store.transaction() as conn:
            for row in rows:
                where = f"{row.phase or 'claimed'} on {row.phase_channel or '-'}"
                if row.answered_in_full:
                    state, detail = "sent", f"the daemon stopped after the modem took every part ({where})"
                    found.sent.append(row.id)
                elif row.may_have_gone_out:
                    state, detail = "uncertain", f"the daemon stopped at {where}: may have gone out"
                    found.uncertain.append(row)
                else:
                    state, detail = "queued", f"the daemon stopped at {where}: never went out, resent"
                    found.resent.append(row.id)
                conn.execute(
                    "UPDATE paging_outbox SET state = ?, next_at = ?, sent_at = CASE WHEN ? = 'queued'"
                    " THEN NULL ELSE ? END, channel = COALESCE(?, channel), detail = ? WHERE id = ?",
                    (
                        state,
                        now,
                        state,
                        now,
                        row.phase_channel if state != "queued" else None,
                        (detail + ("; " + row.detail if row.detail else ""))[:1000],
                        row.id,
                    ),
                )
        return found

    def progress(self, row_id: int, channel: str, phase: str, part: int, parts: int) -> None:
        """Persist how far a send got, before the step it names is taken (the phase table)."""
        sent = part + 1 if phase == "answered" else part
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE paging_outbox SET phase = ?, phase_channel = ?, parts_sent = ?, parts_total = ?"
                " WHERE id = ? AND state = 'sending'",
                (phase, channel, sent, parts, row_id),
            )

    def due(self, now: float, limit: int = 50) -> list[Row]:
        rows = self.store.query(
            "SELECT * FROM paging_outbox WHERE state IN ('queued', 'held') AND next_at <= ?"
            " ORDER BY severity = 'critical' DESC, next_at, id LIMIT ?",
            (now, limit),
        )
        return [Row.of(r) for r in rows]

    def next_due(self) -> float | None:
        rows = self.store.query(
            "SELECT MIN(next_at) AS t FROM paging_outbox WHERE state IN ('queued', 'held')"
        )
        return rows[0]["t"] if rows and rows[0]["t"] is not None else None

    def claim(self, row_id: int, now: float) -> bool:
        with self.store.transaction() as conn:
            return (
                conn.execute(
                    "UPDATE paging_outbox SET state = 'sending', attempts = attempts + 1, next_at = ?,"
                    " phase = 'claimed', phase_channel = NULL, parts_sent = 0, parts_total = 0"
                    " WHERE id = ? AND state IN ('queued', 'held')",
                    (now, row_id),
                ).rowcount
                == 1
            )

    def hold(self, row_id: int, until: float, why: str) -> bool:
        """A limit holds this page until ``until``; True if it was not held already."""
        with self.store.transaction() as conn:
            return (
                conn.execute(
                    "UPDATE paging_outbox SET state = 'held', next_at = ?, detail = ? WHERE id = ?"
                    " AND state IN ('queued', 'held') AND NOT (state = 'held' AND next_at = ?)",
                    (until, why, row_id, until),
                ).rowcount
                == 1
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
        uncertain_on: Sequence[str] = (),
        others: Sequence[str] = (),
    ) -> str:
        """Record the outcome (and, if a channel was uncertain, its follow-ups, in the same
        transaction); returns the row's new state."""
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
                " detail = ?, uncertain_on = ? WHERE id = ?",
                (
                    state,
                    next_at,
                    now if state in ("sent", "uncertain") else None,
                    channel or None,
                    delivery.reference,
                    detail[:1000],
                    ",".join(uncertain_on),
                    row.id,
                ),
            )
            if uncertain_on:
                self.follow_up(conn, row, uncertain_on, others, now, delivered_elsewhere=state == "sent")
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
        """Pages queued or being sent (held ones are counted apart: they wait on purpose)."""
        return self.count("queued", "sending")

    def count(self, *states: str) -> int:
        marks = ", ".join("?" for _ in states)
        return int(
            self.store.query(f"SELECT COUNT(*) AS n FROM paging_outbox WHERE state IN ({marks})", states)[0][
                "n"
            ]
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
