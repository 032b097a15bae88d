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
import datetime as dt
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry

from appliance.api import Caller, RequestError
from appliance.clock import Clock, SystemClock
from appliance.errors import ConfigError
from appliance.fields import host_port
from appliance.logs import kv
from appliance.paging import commands, settings
from appliance.paging.channel import Channel, Delivery, Message, send_with_fallback
from appliance.paging.incidents import (
    Ack,
    Clear,
    Event,
    Incident,
    Note,
    Page,
    PagerState,
    Raise,
    Tick,
    Undelivered,
    step,
)
from appliance.paging.metrics import PagingMetrics
from appliance.paging.modem import GsmChannel, Inbound, ModemHealth
from appliance.paging.oncall import Contact, Roster, Severity, schedule
from appliance.paging.outbox import Outbox, Row
from appliance.paging.pdu import StatusReport
from appliance.paging.settings import PagingConfig as Config
from appliance.paging.webhook import WebhookReceiver
from appliance.store import Store

log = logging.getLogger(f"hotsite.{__name__}")

Handler = Callable[[Caller, dict[str, Any]], Awaitable[Any]]
TICK_S = 1.0
SEND_CONCURRENCY = 4
NOTICE_MARK = "limit notice, digest at"


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
        self.on_receiver_outcome: Callable[[str], None] = lambda outcome: None  # counted by the daemon
        self.decided_at: dict[str, float] = {}  # page dedup -> monotonic time decided (for benchmarks)

    # -- life ----------------------------------------------------------------------

    async def start(self) -> None:
        self._recover()
        for channel in self.channels.values():
            await channel.start()
        paging = self.config.paging
        if paging.alertmanager_listen:
            host, port = host_port(paging.alertmanager_listen)
            token = settings.read_secret(paging.alertmanager_token_file, "paging.alertmanager_token_file")
            self._receiver = WebhookReceiver(
                host,
                port,
                self._inbound_events,
                token=token,
                token_name=paging.alertmanager_token_name,
                allow_unauthenticated=paging.alertmanager_allow_unauthenticated,
                on_outcome=self.on_receiver_outcome,
            )
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

    def _recover(self) -> None:
        """Rows a previous life left in ``sending``: resent, uncertain (followed up) or sent."""
        now = self.clock.time()
        found = self.outbox.recover(now)
        with self.store.transaction() as conn:
            for row in found.uncertain:
                on = [row.phase_channel] if row.phase_channel in self.channels else []
                others = [n for n in self._names(row) if n not in on]
                self.outbox.follow_up(conn, row, on, others, now)
        for outcome, rows in (("resent", found.resent), ("uncertain", found.uncertain), ("sent", found.sent)):
            if rows:
                self.metrics.recovered.labels(outcome=outcome).inc(len(rows))
        if found.resent or found.uncertain or found.sent:
            message = (
                f"the daemon stopped while sending: {len(found.resent)} page(s) had certainly not gone out"
                f" and are resent; {len(found.uncertain)} may have gone out and are sent again on the next"
                f" channel and marked (repeat); {len(found.sent)} had gone out"
            )
            log.warning(message, extra=kv(resent=found.resent, uncertain=[r.id for r in found.uncertain]))
            self.store.record(
                "paging.recovered",
                message=message,
                data={
                    "resent": found.resent,
                    "uncertain": [r.id for r in found.uncertain],
                    "sent": found.sent,
                },
            )

    def _names(self, row: Row) -> list[str]:
        return [n for n in (row.channels or self.order) if n in self.channels]

    @property
    def receiver_port(self) -> int | None:
        return self._receiver.port if self._receiver else None

    # -- events in -----------------------------------------------------------------

    async def raise_incident(
        self, key: str, summary: str, severity: Severity = "error", group: str = "", source: str = "engine"
    ) -> list[Any]:
        """A condition started (engine, health model): dedupe by ``key``, group by ``group``."""
        return await self.apply(Raise(key, summary, severity, group, source))

    async def clear(self, key: str, source: str = "engine", reason: str = "") -> list[Any]:
        """The condition ``key`` is gone (``reason``: why, if not recovery); the incident resolves when
        all its conditions are."""
        return await self.apply(Clear(key, source, reason))

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
                if isinstance(action, Page) and action.kind != "trigger" and not _was_told(conn, action):
                    continue  # "acknowledged"/"resolved" only to someone who got the page itself
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
                        severity=_severity(action.incident, before, after),
                    )
                    self.decided_at[action.dedup] = mono
                elif isinstance(action, Note) and action.kind in ("acked", "resolved") and action.incident:
                    self._tell_pagerduty(conn, action.incident, action.kind, action.message, now)

    def _tell_pagerduty(self, conn: Any, incident_id: int, kind: str, why: str, now: float) -> None:
        """PagerDuty gets ``acknowledge``/``resolve`` for an incident it was told about (a trigger
        went out through it), so its own escalation stops too."""
        from appliance.paging.webhook import WebhookChannel

        told = conn.execute(
            "SELECT DISTINCT channel, contact FROM paging_outbox WHERE incident_id = ? AND kind = 'trigger'"
            " AND state IN ('sent', 'uncertain') AND channel IS NOT NULL",
            (incident_id,),
        ).fetchall()
        for channel, contact in told:
            target = self.channels.get(channel)
            if not (isinstance(target, WebhookChannel) and target.format == "pagerduty"):
                continue
            self.outbox.enqueue(
                conn,
                dedup=f"{incident_id}:pagerduty:{kind}:{channel}",
                incident_id=incident_id,
                contact=contact,
                kind="ack" if kind == "acked" else "resolve",
                text=f"[{self.roster.site}] #{incident_id} {why}",
                reason=f"PagerDuty was told about #{incident_id}: it is {kind}",
                channels=[channel],
                now=now,
            )

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
        if note.kind == "deferred":
            self.metrics.deferred.labels(reason="night").inc()
        level = (
            logging.ERROR
            if note.kind == "undelivered"
            else logging.WARNING
            if note.kind in ("opened", "exhausted", "no_policy", "no_target", "deferred")
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

    def wake(self) -> None:
        """Look at the outbox now rather than at the next due time it knew of (a clock moved)."""
        self._wake.set()

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
            reply = await self._sms_ack(contact, command, actor)
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

    async def _sms_ack(self, contact: Contact, command: commands.Command, actor: str) -> str:
        """An ACK by text: only with the short code, only from someone paged or on call for it."""
        incident, why = commands.authorise_ack(self.state, self.roster, contact, command, self.clock.time())
        if incident is None:
            self.metrics.inbound.labels(result="ack_refused").inc()
            log.warning(
                "SMS acknowledgement refused", extra=kv(contact=contact.name, text=command.ref, why=why)
            )
            self.store.record(
                "paging.sms_ack_refused",
                actor=actor,
                message=f"ACK {command.number} {command.ref}".replace("  ", " ") + f" refused: {why}",
                data={"ref": command.ref, "number": command.number},
            )
            return f"hotsite: not acknowledged: {why}. " + self._status_line()
        actions = await self.apply(Ack(str(incident.id), contact.name, "sms"), actor=actor)
        acked = any(isinstance(a, Note) and a.kind == "acked" for a in actions)
        self.metrics.inbound.labels(result="ack").inc()
        if acked:
            return f"hotsite: #{incident.id} acknowledged, thank you."
        return f"hotsite: #{incident.id} was already acknowledged by {incident.acked_by}."

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
        """Send what is due now, critical first: at most one row per exclusive channel (the modem)
        and ``SEND_CONCURRENCY`` in all, so a row is claimed only when its channel can take it
        and a critical page raised meanwhile is next. Returns how many rows were handled."""
        self._digest_due()
        now = self.clock.time()
        picked: list[Row] = []
        lanes: set[str] = set()
        for row in self.outbox.due(now, limit=SEND_CONCURRENCY * 8):  # critical first
            lane = self._lane(row)
            if lane is not None and lane in lanes:
                continue  # claimed only when its channel can take it: next round
            if lane is not None:
                lanes.add(lane)
            picked.append(row)
            if len(picked) == SEND_CONCURRENCY:
                break
        if not picked:
            return 0
        await asyncio.gather(*(self._send_row(r) for r in picked))
        self._update_gauges()
        return len(picked)

    def _lane(self, row: Row) -> str | None:
        """The exclusive channel (the modem) this row will use first, if any."""
        contact = self.roster.contacts.get(row.contact) or Contact(row.contact)
        first = next((n for n in self._names(row) if self.channels[n].can_reach(contact)), None)
        return first if first is not None and self.channels[first].exclusive else None

    async def _send_row(self, row: Row) -> None:
        """One row: held by the limit (never when critical), or claimed, sent, recorded, reported."""
        paging = self.config.paging
        now = self.clock.time()
        incident = self.state.incidents.get(row.incident_id or -1)
        severity = incident.severity if incident else row.severity
        # Critical is never held; nor is a page sent again because its first send was uncertain.
        if row.kind == "trigger" and severity != "critical" and row.repeat_of is None:
            until = self.outbox.allowed_at(row.contact, now, paging.rate_limit_per_hour)
            if until is not None:
                self._held(row, until, f"rate limit: {paging.rate_limit_per_hour} pages per hour")
                return
        if not self.outbox.claim(row.id, now):
            return
        names = self._names(row)
        delivery, used, tried = await self._deliver(row, names, severity)
        uncertain_on = [
            name for name, _, rest in (t.partition(": ") for t in tried) if rest.startswith("uncertain")
        ]
        state = self.outbox.finish(
            row,
            delivery,
            used,
            tried,
            self.clock.time(),
            max_attempts=paging.max_attempts,
            backoff_s=paging.retry_backoff_s,
            uncertain_on=uncertain_on,
            others=[n for n in names if n not in uncertain_on],
        )
        await self._report(row, state, used, "; ".join(tried) or delivery.detail, uncertain_on, tried)

    async def _deliver(self, row: Row, names: list[str], severity: str) -> tuple[Delivery, str, list[str]]:
        """Send through the fallback order, persisting each step's phase; count each channel tried."""
        contact = self.roster.contacts.get(row.contact) or Contact(row.contact)
        text = self._notice_text(row) if row.kind == "notice" else row.text
        message = Message(
            contact,
            text,
            subject=text[:120],
            incident=row.incident_id,
            kind=row.kind,
            dedup_key=row.dedup,
            severity=severity,
            details={"reason": row.reason},
            progress=lambda channel, phase, part, parts: self.outbox.progress(
                row.id, channel, phase, part, parts
            ),
        )
        try:
            delivery, used, tried = await send_with_fallback([self.channels[n] for n in names], message)
        except Exception as exc:  # a channel broke its contract: count it as a retryable failure
            log.exception("channel raised while sending", extra=kv(page=row.id))
            delivery, used, tried = Delivery("failed", f"bug: {exc!r}"), "", []
        for line in tried:
            name, _, rest = line.partition(": ")
            self.metrics.pages.labels(channel=name, result=rest.split(" ", 1)[0]).inc()
        return delivery, used, tried

    async def _report(
        self, row: Row, state: str, used: str, outcome: str, uncertain_on: list[str], tried: list[str]
    ) -> None:
        """Log every outcome (ERROR when no channel took it), audit the uncertain and the failed."""
        level = logging.ERROR if state == "failed" else logging.WARNING if uncertain_on else logging.INFO
        if state == "queued":
            level = logging.WARNING
        log.log(
            level,
            "page " + state + (" NOT DELIVERED on any channel" if state == "failed" else ""),
            extra=kv(page=row.id, contact=row.contact, kind=row.kind, channel=used, detail=outcome[:200]),
        )
        if uncertain_on:
            self.store.record(
                "paging.page_uncertain",
                subject=f"incident:{row.incident_id}",
                message=f"page to {row.contact} may have gone out on {', '.join(uncertain_on)}: sent again"
                " on the next channel and marked (repeat)",
                data={"page": row.id, "tried": tried},
            )
            self._wake.set()
        if state == "failed":
            await self._undelivered(row, outcome)

    def _held(self, row: Row, until: float, why: str) -> None:
        """A limit holds a page: loud (WARNING, audit, metric), shown, and the contact told once."""
        if not self.outbox.hold(row.id, until, why):
            return
        reason = "rate_limit"
        self.metrics.deferred.labels(reason=reason).inc()
        at = _hhmm(until)
        log.warning(
            f"page held until {at}: {why}",
            extra=kv(page=row.id, contact=row.contact, incident=row.incident_id),
        )
        self.store.record(
            "paging.held",
            subject=f"incident:{row.incident_id}",
            message=f"page to {row.contact} held until {at}: {why}",
            data={"page": row.id, "until": until, "reason": reason},
        )
        self._limit_notice(row.contact, until)

    def _limit_notice(self, contact: str, until: float) -> None:
        """One text per window: how many pages wait, how to read them, when the digest comes."""
        now = self.clock.time()
        text = f"{NOTICE_MARK} {_hhmm(until)}"  # the count is filled in when it is sent
        with self.store.transaction() as conn:
            queued = self.outbox.enqueue(
                conn,
                dedup=f"notice:{contact}:{int(until)}",
                incident_id=None,
                contact=contact,
                kind="notice",
                text=text,
                reason="the contact's page limit was reached: told once per window",
                channels=[],
                now=now,
            )
        if queued:
            self._wake.set()

    def _notice_text(self, row: Row) -> str:
        """The limit notice, counted when it goes out (every page held in this pass is in it)."""
        waiting = self.store.query(
            "SELECT COUNT(DISTINCT incident_id) AS n FROM paging_outbox WHERE contact = ? AND state = 'held'",
            (row.contact,),
        )[0]["n"]
        at = row.text.removeprefix(NOTICE_MARK).strip()
        return (
            f"[{self.roster.site}] page limit reached: {waiting} incident(s) waiting for you."
            f" Reply STATUS to read them; a digest follows at {at}."
        )

    def _digest_due(self) -> int:
        """Pages held for a contact whose window reopened go out as ONE digest; returns digests queued."""
        now = self.clock.time()
        due = self.store.query(
            "SELECT * FROM paging_outbox WHERE state = 'held' AND next_at <= ? ORDER BY contact, id", (now,)
        )
        by_contact: dict[str, list[Row]] = {}
        for r in due:
            by_contact.setdefault(r["contact"], []).append(Row.of(r))
        made = 0
        for contact, rows in by_contact.items():
            if len(rows) < 2:
                continue
            lines = [r.text.split("] ", 1)[-1].split(". Reply ACK")[0] for r in rows[:5]]
            more = f"; and {len(rows) - 5} more" if len(rows) > 5 else ""
            text = (
                f"[{self.roster.site}] digest, {len(rows)} page(s) held by the limit: "
                + "; ".join(lines)
                + more
                + ". Reply ACK <code> or STATUS"
            )
            with self.store.transaction() as conn:
                self.outbox.enqueue(
                    conn,
                    dedup=f"digest:{contact}:{rows[0].id}",
                    incident_id=None,
                    contact=contact,
                    kind="digest",
                    text=text,
                    reason=f"{len(rows)} held page(s) for {contact}, sent as one when the window reopened",
                    channels=[],
                    now=now,
                )
                conn.executemany(
                    "UPDATE paging_outbox SET state = 'merged', detail = 'sent in a digest' WHERE id = ?",
                    [(r.id,) for r in rows],
                )
            made += 1
        return made

    async def _undelivered(self, row: Row, outcome: str) -> None:
        """A page that failed on every channel: ERROR, audit, metric, shown, escalated at once."""
        self.metrics.undelivered.labels(kind=row.kind).inc()
        self.store.record(
            "paging.page_failed",  # the incident report's timeline marks it failed
            subject=f"incident:{row.incident_id}",
            message=f"NOT DELIVERED to {row.contact}: {outcome}"[:1000],
            data={"page": row.id, "attempts": row.attempts + 1},
        )
        if row.kind == "trigger" and row.incident_id is not None:
            await self.apply(Undelivered(row.incident_id, row.contact, outcome[:200]))

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
        active = [
            {**i.to_json(), "pages": self._page_lines(i)}
            for i in sorted(self.state.incidents.values(), key=lambda i: i.id)
        ]
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
            "held": self.outbox.count("held"),
            "channels": [c.health() for c in self.channels.values()],
        }

    def _page_lines(self, incident: Incident) -> list[dict[str, Any]]:
        """Per contact, what became of the incident's trigger pages, as ``hotsite incidents`` shows it:
        paged (channel) / held until HH:MM / NOT DELIVERED: why / queued / sending / uncertain."""
        rows = self.store.query(
            "SELECT contact, state, channel, next_at, detail, repeat_of FROM paging_outbox"
            " WHERE incident_id = ? AND kind = 'trigger' ORDER BY id",
            (incident.id,),
        )
        out: dict[str, dict[str, Any]] = {}
        for row in rows:
            state = row["state"]
            if state == "held":
                line = f"held until {_hhmm(row['next_at'])}"
            elif state == "failed":
                line = f"NOT DELIVERED: {row['detail'][:120]}"
            elif state == "sent":
                line = f"paged ({row['channel']})"
            elif state == "uncertain":
                line = f"uncertain on {row['channel']}: sent again"
            elif state == "merged":
                line = "paged (in a digest)"
            else:
                line = state
            previous = out.get(row["contact"])
            if previous is not None and previous["state"] == "sent" and state in ("uncertain", "cancelled"):
                continue  # an earlier page reached them: that is what matters
            out[row["contact"]] = {"contact": row["contact"], "state": state, "line": line}
        for who, _reason, _ in incident.deferred:
            night_end = self.roster.night.ends_after(self.clock.time()) if self.roster.night else None
            until = f"held until {_hhmm(night_end)}" if night_end else "held for the morning"
            out[who] = {"contact": who, "state": "held", "line": f"{until} (night)"}
        return list(out.values())

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


def _was_told(conn: Any, page: Page) -> bool:
    """Did a trigger page of this incident reach (or may it have reached) this contact?
    A page held by a limit and then cancelled by the ack did not."""
    return (
        conn.execute(
            "SELECT 1 FROM paging_outbox WHERE incident_id = ? AND contact = ? AND kind = 'trigger'"
            " AND state IN ('sent', 'uncertain', 'merged', 'sending', 'queued') LIMIT 1",
            (page.incident, page.contact),
        ).fetchone()
        is not None
    )


def _severity(incident_id: int, before: PagerState, after: PagerState) -> str:
    incident = after.incidents.get(incident_id) or before.incidents.get(incident_id)
    return incident.severity if incident else "error"


def _hhmm(ts: float) -> str:
    """Local wall time, as the technician reads it on the appliance."""
    return dt.datetime.fromtimestamp(ts).strftime("%H:%M")


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
