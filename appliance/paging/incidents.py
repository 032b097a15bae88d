"""The incident and escalation core: ``step(state, event, now, roster) -> (state, actions)``.

Pure: no I/O, no clock. The service feeds it events (a condition raised or
cleared, an acknowledgement, a tick) with the wall time, persists the new
state and the pages it asks for in one transaction, and sends the pages from
the outbox. Everything about *who* is paged *when* and *why* is decided here,
so every rule is testable with a simulated clock.

Rules, each a test:

- A condition is identified by its ``key``: raising an active key again is a
  duplicate (counted, no page). A new key whose ``group`` already has an
  *open* incident joins it (one page thread per group); the incident resolves
  when every condition in it has cleared. A new key whose group's incident is
  already *acknowledged* opens a new incident (never silent: PAGING.md says why).
- A page that failed on every channel (``Undelivered``) escalates the incident
  to its next step at once.
- A new incident walks its escalation policy: step 0 at once, each next step
  ``escalate_after_s`` after the previous, the whole policy ``repeat`` more
  times, then it stops (and says so).
- Acknowledgement stops the escalation; nothing is paged for an incident after
  it was acknowledged or resolved, except the resolve notice.
- On resolve, every contact who was actually paged gets one "resolved" text;
  on acknowledgement, everyone else who was paged gets one "acknowledged by" text.
- At night, a contact is woken only for incidents at least as severe as their
  ``wake_for``; lesser pages wait until the night ends (if still relevant).
- Every page carries the reason it was sent.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from appliance.paging.oncall import RANK, Roster, Severity, resolve_target

Status = Literal["open", "acked", "resolved"]
MAX_CATCH_UP_STEPS = 100  # a tick after a long outage fires overdue steps, but never loops forever


# ---------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Raise:
    key: str
    summary: str
    severity: Severity = "error"
    group: str = ""
    source: str = "engine"
    policy: str | None = None


@dataclass(frozen=True, slots=True)
class Clear:
    key: str
    source: str = "engine"
    reason: str = ""  # why the condition is gone, when not simply "it recovered" (a reload removed it)


@dataclass(frozen=True, slots=True)
class Ack:
    """``incident`` is the id or the short code; ``actor`` a contact name or CLI user."""

    incident: str
    actor: str
    via: str = "cli"


@dataclass(frozen=True, slots=True)
class Resolve:
    incident: str
    actor: str
    via: str = "cli"


@dataclass(frozen=True, slots=True)
class Tick:
    pass


@dataclass(frozen=True, slots=True)
class Undelivered:
    """A page of ``incident`` to ``contact`` failed on every channel: escalate at once."""

    incident: int
    contact: str
    why: str = ""


Event = Raise | Clear | Ack | Resolve | Tick | Undelivered


# ---------------------------------------------------------------------------
# Actions


@dataclass(frozen=True, slots=True)
class Page:
    """Send ``text`` to ``contact``. ``dedup`` is unique per page ever decided."""

    incident: int
    contact: str
    kind: Literal["trigger", "resolve", "ack"]
    text: str
    reason: str
    dedup: str
    channels: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Note:
    """Something worth an audit record: opened, duplicate, grouped, acked, resolved, exhausted…"""

    kind: str
    incident: int | None
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)


Action = Page | Note


# ---------------------------------------------------------------------------
# State


@dataclass(frozen=True, slots=True)
class Incident:
    id: int
    group: str
    keys: tuple[str, ...]
    severity: Severity
    summary: str
    policy: str
    opened_at: float
    short_code: str
    status: Status = "open"
    hits: int = 1
    step: int = 0
    round: int = 0
    next_at: float | None = None
    paged: tuple[str, ...] = ()
    deferred: tuple[tuple[str, str, str], ...] = ()  # (contact, reason, dedup) held for the morning
    acked_by: str | None = None
    acked_at: float | None = None
    resolved_by: str | None = None
    resolved_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "group": self.group,
            "keys": list(self.keys),
            "severity": self.severity,
            "summary": self.summary,
            "policy": self.policy,
            "opened_at": self.opened_at,
            "short_code": self.short_code,
            "status": self.status,
            "hits": self.hits,
            "step": self.step,
            "round": self.round,
            "next_at": self.next_at,
            "paged": list(self.paged),
            "deferred": [list(d) for d in self.deferred],
            "acked_by": self.acked_by,
            "acked_at": self.acked_at,
            "resolved_by": self.resolved_by,
            "resolved_at": self.resolved_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Incident:
        return cls(
            **{
                **data,
                "keys": tuple(data["keys"]),
                "paged": tuple(data["paged"]),
                "deferred": tuple(tuple(d) for d in data["deferred"]),
            }
        )


@dataclass(frozen=True, slots=True)
class PagerState:
    """Active (open or acknowledged) incidents; resolved ones leave the state for the history."""

    incidents: Mapping[int, Incident] = field(default_factory=dict)
    next_id: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"next_id": self.next_id, "incidents": [i.to_json() for i in self.incidents.values()]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PagerState:
        incidents = [Incident.from_json(i) for i in data.get("incidents", [])]
        return cls({i.id: i for i in incidents}, int(data.get("next_id", 1)))

    def find(self, ref: str) -> Incident | None:
        """By id ("42", "#42") or by short code."""
        ref = ref.strip().lstrip("#")
        if ref.isdigit() and int(ref) in self.incidents:
            return self.incidents[int(ref)]
        return next((i for i in self.incidents.values() if i.short_code == ref), None)

    def by_key(self, key: str) -> Incident | None:
        return next((i for i in self.incidents.values() if key in i.keys), None)


# ---------------------------------------------------------------------------
# The transition function


def step(state: PagerState, event: Event, now: float, roster: Roster) -> tuple[PagerState, list[Action]]:
    """Apply one event at wall time ``now``; always followed by the escalation of due incidents."""
    actions: list[Action] = []
    if isinstance(event, Raise):
        state = _raise(state, event, now, roster, actions)
    elif isinstance(event, Clear):
        incident = state.by_key(event.key)
        if incident is not None:
            keys = tuple(k for k in incident.keys if k != event.key)
            cleared = f"{event.key} cleared" + (f": {event.reason}" if event.reason else "")
            if keys:
                state = _put(state, replace(incident, keys=keys))
                actions.append(Note("cleared", incident.id, f"{cleared}; {len(keys)} remain"))
            else:
                state = _resolve(state, incident, now, roster, f"condition {cleared}", "auto", actions)
    elif isinstance(event, Ack):
        state = _ack(state, event, now, roster, actions)
    elif isinstance(event, Undelivered):
        state = _undelivered(state, event, now, actions)
    elif isinstance(event, Resolve):
        incident = state.find(event.incident)
        if incident is None:
            actions.append(Note("resolve_rejected", None, f"no active incident {event.incident!r}"))
        else:
            state = _resolve(
                state,
                incident,
                now,
                roster,
                f"resolved by {event.actor} via {event.via}",
                event.actor,
                actions,
            )
    return _escalate_due(state, now, roster, actions), actions


def _raise(state: PagerState, event: Raise, now: float, roster: Roster, actions: list[Action]) -> PagerState:
    existing = state.by_key(event.key)
    if existing is not None:
        actions.append(
            Note("duplicate", existing.id, f"{event.key} raised again", {"hits": existing.hits + 1})
        )
        updated = _worsened(replace(existing, hits=existing.hits + 1), event, roster, actions)
        return _put(state, updated)
    group = event.group or event.key
    # Only an OPEN incident takes a new condition: one already acknowledged would swallow
    # it silently (the person who acked is busy with the first failure), so a new one opens.
    grouped = next((i for i in state.incidents.values() if i.group == group and i.status == "open"), None)
    acked = next((i for i in state.incidents.values() if i.group == group and i.status == "acked"), None)
    if grouped is not None:
        actions.append(
            Note("grouped", grouped.id, f"{event.key} joined incident #{grouped.id}: {event.summary}")
        )
        joined = replace(grouped, keys=(*grouped.keys, event.key), hits=grouped.hits + 1)
        return _put(state, _worsened(joined, event, roster, actions))
    policy = roster.policy_for(event.severity, event.policy)
    summary = event.summary
    if acked is not None:
        summary = f"{summary} (new, while #{acked.id} is acknowledged by {acked.acked_by})"[:300]
    incident = Incident(
        id=state.next_id,
        group=group,
        keys=(event.key,),
        severity=event.severity,
        summary=summary,
        policy=policy.name if policy else "",
        opened_at=now,
        short_code=_short_code(state, state.next_id, event.key),
        next_at=now if policy else None,
    )
    actions.append(
        Note(
            "opened",
            incident.id,
            event.summary,
            {"key": event.key, "severity": event.severity, "source": event.source, "policy": incident.policy},
        )
    )
    if policy is None:
        actions.append(Note("no_policy", incident.id, "no escalation policy: nobody will be paged"))
    return replace(_put(state, incident), next_id=state.next_id + 1)


def _worsened(incident: Incident, event: Raise, roster: Roster, actions: list[Action]) -> Incident:
    """A more severe condition on an incident: while it is open, everyone paged is told.

    Without this, a contact paged "WARNING: primary judged down" would never hear that
    the failover it led to has started (CRITICAL): the severity rose in silence. The
    summary becomes the worse condition's; pages held overnight go out now if the new
    severity wakes their contact. An acknowledged incident is only updated: someone
    is on it, and no trigger page follows an acknowledgement.
    """
    if RANK[event.severity] <= RANK[incident.severity]:
        return incident
    worse = replace(incident, severity=event.severity, summary=event.summary[:300])
    actions.append(
        Note(
            "worsened",
            incident.id,
            f"#{incident.id} raised from {incident.severity} to {event.severity}: {event.summary}",
            {"from": incident.severity, "to": event.severity, "key": event.key},
        )
    )
    if worse.status != "open":
        return worse
    text = _text(roster, worse, now_worse=True)
    held: list[tuple[str, str, str]] = []
    paged = list(worse.paged)
    for who, reason, dedup in worse.deferred:
        contact = roster.contacts.get(who)
        if contact is not None and RANK[event.severity] >= RANK[contact.wake_for]:
            woken = f"{reason}; woken: now {event.severity}"
            actions.append(Page(worse.id, who, "trigger", text, woken, dedup))
            if who not in paged:
                paged.append(who)
        else:
            held.append((who, reason, dedup))
    for who in worse.paged:
        reason = f"#{worse.id} raised to {event.severity}: {who} was paged for it"
        dedup = f"{worse.id}:worse:{event.severity}:{who}"
        actions.append(Page(worse.id, who, "trigger", text, reason, dedup))
    return replace(worse, deferred=tuple(held), paged=tuple(paged))


def _undelivered(state: PagerState, event: Undelivered, now: float, actions: list[Action]) -> PagerState:
    incident = state.incidents.get(event.incident)
    if incident is None or incident.status != "open":
        return state
    if incident.next_at is None:
        actions.append(
            Note(
                "undelivered",
                incident.id,
                f"NOT DELIVERED to {event.contact}: {event.why}; no further escalation step",
                {"contact": event.contact},
            )
        )
        return state
    actions.append(
        Note(
            "undelivered",
            incident.id,
            f"NOT DELIVERED to {event.contact}: {event.why}; escalating to the next step now",
            {"contact": event.contact},
        )
    )
    return _put(state, replace(incident, next_at=min(incident.next_at, now)))


def _ack(state: PagerState, event: Ack, now: float, roster: Roster, actions: list[Action]) -> PagerState:
    incident = state.find(event.incident)
    if incident is None:
        actions.append(
            Note(
                "ack_rejected",
                None,
                f"no active incident {event.incident!r}",
                {"actor": event.actor, "via": event.via},
            )
        )
        return state
    if incident.status == "acked":
        actions.append(
            Note(
                "ack_duplicate",
                incident.id,
                f"already acknowledged by {incident.acked_by}",
                {"actor": event.actor, "via": event.via},
            )
        )
        return state
    actions.append(
        Note(
            "acked",
            incident.id,
            f"acknowledged by {event.actor} via {event.via}",
            {"actor": event.actor, "via": event.via, "after_s": now - incident.opened_at},
        )
    )
    text = f"[{roster.site}] #{incident.id} acknowledged by {event.actor} ({event.via}): {incident.summary}"
    for contact in incident.paged:
        if contact != event.actor:
            actions.append(
                Page(
                    incident.id,
                    contact,
                    "ack",
                    text[:300],
                    reason=f"#{incident.id} acknowledged by {event.actor}; {contact} had been paged",
                    dedup=f"{incident.id}:ack:{contact}",
                )
            )
    return _put(
        state,
        replace(incident, status="acked", acked_by=event.actor, acked_at=now, next_at=None, deferred=()),
    )


def _resolve(
    state: PagerState,
    incident: Incident,
    now: float,
    roster: Roster,
    why: str,
    actor: str,
    actions: list[Action],
) -> PagerState:
    actions.append(Note("resolved", incident.id, why, {"paged": list(incident.paged)}))
    text = _text(roster, incident, resolved=True)
    for contact in incident.paged:
        actions.append(
            Page(
                incident.id,
                contact,
                "resolve",
                text,
                reason=f"#{incident.id} resolved ({why}); {contact} had been paged",
                dedup=f"{incident.id}:resolve:{contact}",
            )
        )
    return replace(state, incidents={k: v for k, v in state.incidents.items() if k != incident.id})


def _escalate_due(state: PagerState, now: float, roster: Roster, actions: list[Action]) -> PagerState:
    for incident_id in sorted(state.incidents):
        incident = state.incidents[incident_id]
        if incident.status != "open":
            continue
        incident = _morning(incident, now, roster, actions)
        for _ in range(MAX_CATCH_UP_STEPS):
            if incident.next_at is None or incident.next_at > now:
                break
            incident = _fire(incident, now, roster, actions)
        state = _put(state, incident)
    return state


def _fire(incident: Incident, now: float, roster: Roster, actions: list[Action]) -> Incident:
    """Fire the incident's current step; schedule the next (or stop after the last round)."""
    policy = roster.policies.get(incident.policy)
    if policy is None or not policy.steps:
        return replace(incident, next_at=None)
    index = min(incident.step, len(policy.steps) - 1)
    current = policy.steps[index]
    night = roster.night is not None and roster.night.is_night(now)
    paged, deferred = list(incident.paged), list(incident.deferred)
    where = f"step {index + 1}/{len(policy.steps)} of policy {policy.name}, round {incident.round + 1}"
    seen: set[str] = set()
    for target in current.targets:
        who, why = resolve_target(roster, target, now)
        if who is None or who in seen:
            if who is None:
                actions.append(Note("no_target", incident.id, f"{where}: {why}"))
            continue
        seen.add(who)
        contact = roster.contacts.get(who)
        if contact is None:
            actions.append(Note("no_target", incident.id, f"{where}: {who!r} is not a configured contact"))
            continue
        reason = f"#{incident.id} {incident.severity}, {where}: {who} {why}"
        dedup = f"{incident.id}:trigger:r{incident.round}:s{index}:{who}"
        if night and RANK[incident.severity] < RANK[contact.wake_for]:
            deferred.append((who, reason + "; held overnight", dedup))
            actions.append(
                Note(
                    "deferred",
                    incident.id,
                    f"{who} not woken for a {incident.severity} incident; paged in the morning",
                )
            )
            continue
        actions.append(
            Page(incident.id, who, "trigger", _text(roster, incident), reason, dedup, current.channels)
        )
        if who not in paged:
            paged.append(who)
    nxt, rnd = index + 1, incident.round
    next_at: float | None = (incident.next_at or now) + current.escalate_after_s
    if nxt >= len(policy.steps):
        if rnd < policy.repeat:
            nxt, rnd = 0, rnd + 1
        else:
            next_at = None
            actions.append(
                Note(
                    "exhausted",
                    incident.id,
                    f"policy {policy.name} exhausted after {rnd + 1} round(s) without an ack",
                )
            )
    return replace(
        incident, step=nxt, round=rnd, next_at=next_at, paged=tuple(paged), deferred=tuple(deferred)
    )


def _morning(incident: Incident, now: float, roster: Roster, actions: list[Action]) -> Incident:
    """Deliver pages held overnight, once the night is over."""
    if not incident.deferred or (roster.night is not None and roster.night.is_night(now)):
        return incident
    paged = list(incident.paged)
    for who, reason, dedup in incident.deferred:
        actions.append(
            Page(incident.id, who, "trigger", _text(roster, incident), reason + ", sent after night", dedup)
        )
        if who not in paged:
            paged.append(who)
    return replace(incident, deferred=(), paged=tuple(paged))


def _put(state: PagerState, incident: Incident) -> PagerState:
    return replace(state, incidents={**state.incidents, incident.id: incident})


def _short_code(state: PagerState, incident_id: int, key: str) -> str:
    """A 4-digit code to text back instead of "ACK <id>"; unique among active incidents."""
    taken = {i.short_code for i in state.incidents.values()}
    code = (zlib.crc32(f"{incident_id}:{key}".encode()) % 9000) + 1000
    while str(code) in taken or str(code) == str(incident_id):
        code = 1000 + (code - 999) % 9000
    return str(code)


def _text(roster: Roster, incident: Incident, *, resolved: bool = False, now_worse: bool = False) -> str:
    if resolved:
        return f"[{roster.site}] RESOLVED #{incident.id}: {incident.summary}"
    now = "now " if now_worse else ""
    return (
        f"[{roster.site}] #{incident.id} {now}{incident.severity.upper()}: {incident.summary}."
        f" Reply ACK {incident.id} or {incident.short_code}"
    )
