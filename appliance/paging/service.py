"""``PagingService``: wires the escalation core, the outbox, the channels and the control API.

The daemon (``appliance.app``) creates one, calls :meth:`start` and
:meth:`stop`, registers :meth:`handlers` on the control API, and reports
conditions with :meth:`raise_incident` / :meth:`clear`. Every event goes
through :meth:`apply`: one lock, one pure ``step``, one transaction that
stores the new state together with the pages it decided, then the audit
records, then a nudge to the sender.

When that transaction cannot be written (the state store's disk full), the
new state is kept in memory and the pages just decided are sent at once from
memory, with no outbox row (no retry, no record): a full disk must still
reach somebody. ``hotsite_paging_unrecorded_total`` counts those events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry

from appliance import config as config_mod
from appliance.api import Caller, RequestError
from appliance.clock import Clock, SystemClock
from appliance.config import Config
from appliance.errors import ConfigError
from appliance.logs import kv
from appliance.paging import commands, settings
from appliance.paging.channel import Channel, Message, send_with_fallback
from appliance.paging.incidents import Ack, Clear, Event, Incident, Note, Page, PagerState, Raise, Tick, step
from appliance.paging.metrics import PagingMetrics
from appliance.paging.modem import GsmChannel, Inbound, ModemHealth
from appliance.paging.oncall import Contact, Roster, Severity, schedule
from appliance.paging.outbox import Outbox, Row
from appliance.paging.pdu import StatusReport
from appliance.paging.webhook import WebhookReceiver
from appliance.store import Store

log = logging.getLogger(__name__)

Handler = Callable[[Caller, dict[str, Any]], Awaitable[Any]]
TICK_S = 1.0
SEND_CONCURRENCY = 4


class PagingService:
    """Incidents, escalation and paging for the appliance.

    ``status_text()`` returns one short line about the site (for the STATUS
    reply by SMS); ``channels`` replaces the channels built from the config
    (tests, benchmarks). ``tick_s`` is how often escalation timers are checked.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        registry: CollectorRegistry,
        *,
        clock: Clock | None = None,
        status_text: Callable[[], str] = lambda: "",
        channels: dict[str, Channel] | None = None,
        tick_s: float = TICK_S,
    ) -> None:
        settings.check(config)
        self.config = config
        self.store = store
        self.clock = clock or SystemClock()
        self.status_text = status_text
        self.metrics = PagingMetrics(registry)
        self.roster: Roster = settings.roster(config)
        self.outbox = Outbox(store)
        self.tick_s = tick_s
        self.channels: dict[str, Channel] = (
            channels if channels is not None else settings.build_channels(config)
        )
        for channel in self.channels.values():
            if isinstance(channel, GsmChannel) and channel.on_text is None:
                for hook, value in self._gsm_hooks(channel.name).items():
                    setattr(channel, hook, value)
        configured = [n for n in settings.channel_order(config) if n in self.channels]
        self.order = configured + [n for n in self.channels if n not in configured]
        self.state = self._load_state()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._memory_sends: set[asyncio.Task[None]] = set()  # pages sent while the store is full
        self._receiver: WebhookReceiver | None = None
        self.decided_at: dict[str, float] = {}  # page dedup -> monotonic time decided (for benchmarks)

    # -- life ----------------------------------------------------------------------

    async def start(self) -> None:
        recovered = self.outbox.recover()
        if recovered:
            self.store.record(
                "paging.uncertain",
                message=f"{recovered} page(s) were being sent when the daemon"
                " stopped: may have gone out, not resent",
                data={"count": recovered},
            )
        for channel in self.channels.values():
            await channel.start()
        paging = self.config.paging
        if paging.alertmanager_listen:
            host, port = config_mod.host_port(paging.alertmanager_listen)
            token = settings.read_secret(paging.alertmanager_token_file, "paging.alertmanager_token_file")
            self._receiver = WebhookReceiver(host, port, self._inbound_events, token=token)
            await self._receiver.start()
        self._tasks = [
            asyncio.create_task(self._sender(), name="paging:sender"),
            asyncio.create_task(self._ticker(), name="paging:ticker"),
        ]
        self._update_gauges()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._receiver is not None:
            await self._receiver.stop()
        for channel in self.channels.values():
            with contextlib.suppress(Exception):
                await channel.stop()

    @property
    def receiver_port(self) -> int | None:
        return self._receiver.port if self._receiver else None

    # -- events in -----------------------------------------------------------------

    async def raise_incident(
        self, key: str, summary: str, severity: Severity = "error", group: str = "", source: str = "engine"
    ) -> list[Any]:
        """A condition started (engine, health model): dedupe by ``key``, group by ``group``."""
        return await self.apply(Raise(key, summary, severity, group, source))

    async def clear(self, key: str, source: str = "engine") -> list[Any]:
        """The condition ``key`` is gone; the incident resolves when all its conditions are."""
        return await self.apply(Clear(key, source))

    async def apply(self, event: Event, actor: str = "daemon") -> list[Any]:
        async with self._lock:
            now = self.clock.time()
            before = self.state
            after, actions = step(before, event, now, self.roster)
            try:
                self._persist(before, after, actions, now)
                recorded = True
            except (sqlite3.Error, OSError) as exc:  # disk full: page from memory, never stay silent
                recorded = False
                self._unrecorded(exc, actions)
            self.state = after
        for action in actions:
            if isinstance(action, Note):
                with contextlib.suppress(sqlite3.Error, OSError):  # logged anyway; the store may be full
                    self._note(action, actor)
        if recorded and any(isinstance(a, Page) for a in actions):
            self._wake.set()
        self._update_gauges()
        return actions

    def _persist(self, before: PagerState, after: PagerState, actions: list[Any], now: float) -> None:
        mono = time.monotonic()
        with self.store.transaction() as conn:
            conn.execute(
                "INSERT INTO paging_state (id, state, updated_at) VALUES (1, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
                (json.dumps(after.to_json()), now),
            )
            for incident in after.incidents.values():
                if before.incidents.get(incident.id) != incident:
                    _upsert_incident(conn, incident)
            for incident_id, incident in before.incidents.items():
                if incident_id not in after.incidents:
                    resolved = next(
                        (
                            a
                            for a in actions
                            if isinstance(a, Note) and a.kind == "resolved" and a.incident == incident_id
                        ),
                        None,
                    )
                    conn.execute(
                        "UPDATE paging_incidents SET status = 'resolved', resolved_at = ?, resolved_by = ?"
                        " WHERE id = ?",
                        (now, resolved.message if resolved else "", incident_id),
                    )
                    self.outbox.cancel_triggers(
                        conn, incident_id, "incident resolved before this page went out"
                    )
                elif after.incidents[incident_id].status == "acked" and incident.status != "acked":
                    self.outbox.cancel_triggers(
                        conn, incident_id, "incident acknowledged before this page went out"
                    )
            for action in actions:
                if isinstance(action, Page):
                    self.outbox.enqueue(
                        conn,
                        dedup=action.dedup,
                        incident_id=action.incident,
                        contact=action.contact,
                        kind=action.kind,
                        text=action.text,
                        reason=action.reason,
                        channels=action.channels,
                        now=now,
                    )
                    self.decided_at[action.dedup] = mono

    def _unrecorded(self, exc: BaseException, actions: list[Any]) -> None:
        """The state store refused this event: send its pages now, from memory."""
        self.metrics.unrecorded.inc()
        pages = [a for a in actions if isinstance(a, Page)]
        log.error(
            "paging state not recorded; sending from memory",
            extra=kv(error=str(exc), pages=len(pages)),
        )
        for page in pages:
            task = asyncio.get_running_loop().create_task(self._send_from_memory(page))
            self._memory_sends.add(task)
            task.add_done_callback(self._memory_sends.discard)

    async def _send_from_memory(self, page: Page) -> None:
        """One page with no outbox row: every channel in order until one takes it, once."""
        contact = self.roster.contacts.get(page.contact) or Contact(page.contact)
        names = [n for n in (page.channels or self.order) if n in self.channels]
        incident = self.state.incidents.get(page.incident)
        message = Message(
            contact,
            page.text,
            subject=page.text[:120],
            incident=page.incident,
            kind=page.kind,
            dedup_key=page.dedup,
            severity=incident.severity if incident else "info",
            details={"reason": page.reason},
        )
        try:
            delivery, used, tried = await send_with_fallback([self.channels[n] for n in names], message)
        except Exception:
            log.exception("page from memory failed", extra=kv(contact=page.contact))
            return
        for line in tried:
            name, _, rest = line.partition(": ")
            self.metrics.pages.labels(channel=name, result=rest.split(" ", 1)[0]).inc()
        log.warning(
            "page sent from memory" if delivery.sent else "page from memory failed",
            extra=kv(contact=page.contact, channel=used, detail=delivery.detail[:120]),
        )

    def _note(self, note: Note, actor: str) -> None:
        if note.kind == "acked":
            self.metrics.time_to_ack.observe(float(note.data.get("after_s", 0.0)))
        level = (
            logging.WARNING
            if note.kind in ("opened", "exhausted", "no_policy", "no_target")
            else logging.INFO
        )
        log.log(
            level, f"incident {note.kind}: {note.message}", extra=kv(incident=note.incident, kind=note.kind)
        )
        self.store.record(
            f"paging.{note.kind}",
            actor=str(note.data.get("actor", actor)),
            subject=f"incident:{note.incident}" if note.incident else "",
            message=note.message,
            data=dict(note.data),
        )

    def _load_state(self) -> PagerState:
        rows = self.store.query("SELECT state FROM paging_state WHERE id = 1")
        return PagerState.from_json(json.loads(rows[0]["state"])) if rows else PagerState()

    async def apply_tick(self) -> list[Any]:
        """Run the escalation timers now (the ticker does this every ``tick_s``)."""
        return await self.apply(Tick())

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.apply(Tick())
            except Exception:
                log.exception("paging tick failed; will try again")

    async def _inbound_events(self, events: list[Event], via: str) -> None:
        for event in events:
            await self.apply(event, actor=via)

    # -- inbound SMS ---------------------------------------------------------------

    async def on_text(self, message: Inbound) -> None:
        """A received text: acted on only when it comes from a configured contact's number."""
        contact = self.roster.by_phone(message.sender)
        if contact is None:
            self.metrics.inbound.labels(result="unknown_sender").inc()
            log.warning(
                "text from an unknown number ignored", extra=kv(sender=message.sender, text=message.text[:40])
            )
            self.store.record(
                "paging.sms_ignored",
                actor=f"sms:{message.sender}",
                message="text from a number that is not a contact: ignored",
                data={"text": message.text[:160], "channel": message.channel},
            )
            return
        command = commands.parse(message.text)
        actor = f"sms:{contact.name}"
        if command.verb == "ack":
            actions = await self.apply(Ack(command.ref, contact.name, "sms"), actor=actor)
            ok = any(isinstance(a, Note) and a.kind in ("acked", "ack_duplicate") for a in actions)
            self.metrics.inbound.labels(result="ack" if ok else "not_understood").inc()
            reply = (
                f"hotsite: #{command.ref} acknowledged, thank you."
                if ok
                else f"hotsite: no open incident {command.ref}. " + self._status_line()
            )
        elif command.verb == "status":
            self.metrics.inbound.labels(result="status").inc()
            reply = self._status_line()
        else:
            self.metrics.inbound.labels(result="not_understood").inc()
            reply = commands.HELP
        self.store.record(
            "paging.sms_command",
            actor=actor,
            message=message.text[:160],
            data={"verb": command.verb, "ref": command.ref},
        )
        await self._reply(contact, reply, message.channel)

    def _status_line(self) -> str:
        active = sorted(self.state.incidents.values(), key=lambda i: i.id)
        parts = [f"[{self.roster.site}] {self.status_text()}".strip()]
        if not active:
            parts.append("no open incidents")
        for incident in active[:3]:
            ack = f" ack {incident.acked_by}" if incident.acked_by else ""
            parts.append(f"#{incident.id} {incident.severity} {incident.summary[:50]}{ack}")
        if len(active) > 3:
            parts.append(f"+{len(active) - 3} more")
        return "; ".join(parts)[:300]

    async def _reply(self, contact: Contact, text: str, channel: str) -> None:
        now = self.clock.time()
        with self.store.transaction() as conn:
            self.outbox.enqueue(
                conn,
                dedup=f"reply:{contact.name}:{now}:{hash(text)}",
                incident_id=None,
                contact=contact.name,
                kind="reply",
                text=text,
                reason="answer to a text",
                channels=[channel],
                now=now,
            )
        self._wake.set()

    async def on_report(self, channel: str, reference: int, report: StatusReport) -> None:
        row = self.outbox.mark_delivered(channel, reference, report.delivered, report.status)
        log.info(
            "SMS delivery report",
            extra=kv(channel=channel, reference=reference, delivered=report.delivered, page=row or None),
        )

    def _gsm_hooks(self, name: str) -> dict[str, Any]:
        """Callbacks for the GsmChannel called ``name``: inbound texts, reports, health, events."""

        def on_health(channel: str) -> Callable[[ModemHealth | None], None]:
            def hook(health: ModemHealth | None) -> None:
                self.metrics.modem_up.labels(channel=channel).set(1 if health else 0)
                if health is not None:
                    self.metrics.modem_registered.labels(channel=channel).set(1 if health.registered else 0)
                    if health.signal_dbm is not None:
                        self.metrics.modem_signal.labels(channel=channel).set(health.signal_dbm)

            return hook

        def on_report(channel: str) -> Callable[[int, StatusReport], Awaitable[None]]:
            async def hook(reference: int, report: StatusReport) -> None:
                await self.on_report(channel, reference, report)

            return hook

        return {
            "on_text": self.on_text,
            "on_report": on_report(name),
            "on_health": on_health(name),
            "on_event": lambda event: self.metrics.modem_events.labels(channel=name, event=event).inc(),
        }

    # -- the sender ----------------------------------------------------------------

    async def _sender(self) -> None:
        while True:
            try:
                sent = await self.drain()
            except Exception:
                log.exception("paging sender failed; will try again")
                sent = 0
            if sent:
                continue
            next_due = self.outbox.next_due()
            timeout = 5.0 if next_due is None else max(0.01, min(5.0, next_due - self.clock.time()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def drain(self) -> int:
        """Send what is due now (a few at a time); returns how many rows were handled."""
        now = self.clock.time()
        rows = self.outbox.due(now, limit=SEND_CONCURRENCY * 8)
        if not rows:
            return 0
        semaphore = asyncio.Semaphore(SEND_CONCURRENCY)

        async def one(row: Row) -> None:
            async with semaphore:
                await self._send_row(row)

        await asyncio.gather(*(one(r) for r in rows))
        self._update_gauges()
        return len(rows)

    async def _send_row(self, row: Row) -> None:
        paging = self.config.paging
        now = self.clock.time()
        if row.kind == "trigger":
            until = self.outbox.allowed_at(row.contact, now, paging.rate_limit_per_hour)
            if until is not None:
                self.outbox.defer(row.id, until, f"rate limit: {paging.rate_limit_per_hour} pages per hour")
                return
        if not self.outbox.claim(row.id, now):
            return
        contact = self.roster.contacts.get(row.contact) or Contact(row.contact)
        names = [n for n in (row.channels or self.order) if n in self.channels]
        incident = self.state.incidents.get(row.incident_id or -1)
        message = Message(
            contact,
            row.text,
            subject=row.text[:120],
            incident=row.incident_id,
            kind=row.kind,
            dedup_key=row.dedup,
            severity=incident.severity if incident else "info",
            details={"reason": row.reason},
        )
        try:
            delivery, used, tried = await send_with_fallback([self.channels[n] for n in names], message)
        except Exception as exc:  # a channel broke its contract: count it as a retryable failure
            log.exception("channel raised while sending", extra=kv(page=row.id))
            from appliance.paging.channel import Delivery

            delivery, used, tried = Delivery("failed", f"bug: {exc!r}"), "", []
        for line in tried:
            name, _, rest = line.partition(": ")
            self.metrics.pages.labels(channel=name, result=rest.split(" ", 1)[0]).inc()
        state = self.outbox.finish(
            row,
            delivery,
            used,
            tried,
            self.clock.time(),
            max_attempts=paging.max_attempts,
            backoff_s=paging.retry_backoff_s,
        )
        log.info(
            "page " + state,
            extra=kv(
                page=row.id, contact=row.contact, kind=row.kind, channel=used, detail=delivery.detail[:120]
            ),
        )
        if state in ("failed", "uncertain"):
            self.store.record(
                f"paging.page_{state}",
                subject=f"incident:{row.incident_id}",
                message=f"page to {row.contact}: {'; '.join(tried) or delivery.detail}",
                data={"page": row.id, "attempts": row.attempts + 1},
            )

    def _update_gauges(self) -> None:
        self.metrics.outbox_depth.set(self.outbox.depth())
        for status in ("open", "acked"):
            self.metrics.incidents_open.labels(status=status).set(
                sum(1 for i in self.state.incidents.values() if i.status == status)
            )

    # -- control API -----------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        return {
            "incidents": self._api_incidents,
            "ack": self._api_ack,
            "oncall": self._api_oncall,
            "page_test": self._api_page_test,
        }

    async def _api_incidents(self, caller: Caller, params: dict[str, Any]) -> Any:
        limit = params.get("limit", 20)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 0 <= limit <= 1000:
            raise RequestError("limit must be an integer from 0 to 1000")
        active = [i.to_json() for i in sorted(self.state.incidents.values(), key=lambda i: i.id)]
        recent = [
            dict(r)
            for r in self.store.query(
                "SELECT id, grp, severity, summary, status, opened_at, acked_at, acked_by, resolved_at,"
                " resolved_by"
                " FROM paging_incidents WHERE status = 'resolved' ORDER BY id DESC LIMIT ?",
                (limit,),
            )
        ]
        return {
            "active": active,
            "recent": recent,
            "outbox_depth": self.outbox.depth(),
            "channels": [c.health() for c in self.channels.values()],
        }

    async def _api_ack(self, caller: Caller, params: dict[str, Any]) -> Any:
        ref = params.get("id")
        if not isinstance(ref, str | int) or isinstance(ref, bool) or not str(ref).strip():
            raise RequestError("id must be an incident number or short code")
        actions = await self.apply(Ack(str(ref), caller.actor, "cli"), actor=caller.actor)
        for action in actions:
            if isinstance(action, Note) and action.kind == "acked":
                return {"incident": action.incident, "acked_by": caller.actor}
            if isinstance(action, Note) and action.kind in ("ack_duplicate", "ack_rejected"):
                raise RequestError(action.message)
        raise RequestError(f"incident {ref} was not acknowledged")

    async def _api_oncall(self, caller: Caller, params: dict[str, Any]) -> Any:
        now = self.clock.time()
        return {
            "at": now,
            "rotations": schedule(self.roster, now),
            "night": self.roster.night is not None and self.roster.night.is_night(now),
            "contacts": [
                {
                    "name": c.name,
                    "company": c.company,
                    "phone": c.phone,
                    "email": c.email,
                    "skills": list(c.skills),
                    "wake_for": c.wake_for,
                }
                for c in self.roster.contacts.values()
            ],
            "policies": {
                name: {
                    "repeat": p.repeat,
                    "steps": [
                        {
                            "targets": list(s.targets),
                            "escalate_after_s": s.escalate_after_s,
                            "channels": list(s.channels),
                        }
                        for s in p.steps
                    ],
                }
                for name, p in self.roster.policies.items()
            },
        }

    async def _api_page_test(self, caller: Caller, params: dict[str, Any]) -> Any:
        name = params.get("contact")
        contact = self.roster.contacts.get(name) if isinstance(name, str) else None
        if contact is None:
            raise RequestError(f"unknown contact {name!r} (known: {', '.join(sorted(self.roster.contacts))})")
        text = (
            params.get("message") or f"[{self.roster.site}] test page for {contact.name}; no action needed."
        )
        if not isinstance(text, str) or len(text) > 1000:
            raise RequestError("message must be at most 1000 characters")
        wanted = params.get("channel")
        if wanted is not None and wanted not in self.channels:
            raise RequestError(f"unknown channel {wanted!r} (known: {', '.join(self.channels) or 'none'})")
        results = []
        for channel_name in [wanted] if wanted else self.order:
            channel = self.channels[channel_name]
            if not channel.can_reach(contact):
                results.append(
                    {
                        "channel": channel_name,
                        "result": "skipped",
                        "detail": f"no address for {contact.name} on a {channel.kind} channel",
                    }
                )
                continue
            delivery = await channel.send(
                Message(contact, text, subject=text[:120], kind="test", dedup_key=f"test:{time.time()}")
            )
            self.metrics.pages.labels(channel=channel_name, result=delivery.result).inc()
            results.append({"channel": channel_name, "result": delivery.result, "detail": delivery.detail})
        self.store.record(
            "paging.test",
            actor=caller.actor,
            subject=contact.name,
            message="; ".join(f"{r['channel']}: {r['result']}" for r in results),
            data={"results": results},
        )
        return {"contact": contact.name, "results": results}


def _upsert_incident(conn: Any, incident: Incident) -> None:
    conn.execute(
        "INSERT INTO paging_incidents (id, grp, severity, summary, status, opened_at, acked_at, acked_by,"
        " data)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET severity = excluded.severity,"
        " status = excluded.status, acked_at = excluded.acked_at, acked_by = excluded.acked_by,"
        " data = excluded.data",
        (
            incident.id,
            incident.group,
            incident.severity,
            incident.summary,
            incident.status,
            incident.opened_at,
            incident.acked_at,
            incident.acked_by,
            json.dumps(incident.to_json()),
        ),
    )


__all__ = ["ConfigError", "PagingService"]
