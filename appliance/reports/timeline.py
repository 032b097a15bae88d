"""Incident and drill timelines built from audit-log events: pure functions of the event list.

A bank's operations team files a report after every failover and every drill: when the
trouble was detected, when the site verdict and the decision came, each runbook step and
how long it took, who was paged and when someone acknowledged, and how much data could
have been lost. Everything needed is in the audit log (``hotsite events``), so a report is a
selection of events around an anchor plus arithmetic; nothing here does I/O, which keeps
the reports reproducible from an exported event list.

Anchors: an incident report starts from a ``failover.decision`` (or any failover event)
given by its audit event id, or from a paging incident (``#7``: the ``paging.opened`` event
of incident 7). A drill report starts from a ``failover.drill`` event id (the drill's
result, with per-check durations), or from the ``failover.decision`` that began it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.errors import HotsiteError

Kind = Literal["incident", "drill"]
CATEGORIES = (
    "detection",
    "verdict",
    "decision",
    "runbook",
    "page",
    "ack",
    "resolve",
    "data",
    "note",
    "check",
    "call",
)
LOOKBACK_S = 600.0  # how far before the anchor to look for the detection
HORIZON_S = 6 * 3600.0  # the longest an incident report reaches after its anchor
DRILL_WINDOW_S = 120.0


class ReportError(HotsiteError):
    """The anchor is not in the events, or is not the kind of event the report needs."""


@dataclass(frozen=True, slots=True)
class Entry:
    at: float
    category: str
    title: str
    detail: str = ""
    duration_s: float | None = None  # a span (runbook step, drill check) rather than an instant
    ok: bool | None = None
    event_id: int | None = None


@dataclass(frozen=True, slots=True)
class Timeline:
    kind: Kind
    title: str
    anchor_id: int
    start: float
    end: float
    entries: tuple[Entry, ...]
    figures: dict[str, Any] = field(default_factory=dict)  # headline numbers, name -> value

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "title": self.title,
            "anchor_id": self.anchor_id,
            "start": self.start,
            "end": self.end,
            "figures": self.figures,
            "entries": [
                {
                    "at": e.at,
                    "category": e.category,
                    "title": e.title,
                    "detail": e.detail,
                    "duration_s": e.duration_s,
                    "ok": e.ok,
                    "event_id": e.event_id,
                }
                for e in self.entries
            ],
        }


def parse_ref(ref: str) -> tuple[Literal["event", "incident"], int]:
    """``123`` -> an audit event id; ``#7`` or ``incident:7`` -> paging incident 7."""
    text = ref.strip()
    for prefix, what in (("#", "incident"), ("incident:", "incident"), ("event:", "event")):
        if text.startswith(prefix):
            text, kind = text[len(prefix) :], what
            break
    else:
        kind = "event"
    if not text.isdigit():
        raise ReportError(f"{ref!r} is not an event id (123) or an incident (#7)")
    return kind, int(text)  # type: ignore[return-value]


def _find(events: Sequence[dict[str, Any]], ref: str, kind: Kind) -> dict[str, Any]:
    what, number = parse_ref(ref)
    if what == "incident":
        subject = f"incident:{number}"
        found = [e for e in events if e["kind"] == "paging.opened" and e["subject"] == subject]
        if not found:
            raise ReportError(f"incident #{number} was not opened within the events read")
        return min(found, key=lambda e: e["id"])
    event = next((e for e in events if e["id"] == number), None)
    if event is None:
        raise ReportError(f"event {number} is not within the events read (too old, or no such event)")
    wanted = (
        ("failover.drill", "failover.decision")
        if kind == "drill"
        else ("failover.", "paging.", "site.", "probe.")
    )
    if not event["kind"].startswith(wanted):
        raise ReportError(f"event {number} is a {event['kind']} event, not one a {kind} report starts from")
    if (
        kind == "drill"
        and event["kind"] == "failover.decision"
        and (event.get("data") or {}).get("to") != "drill"
    ):
        raise ReportError(f"event {number} is a decision that did not start a drill: no drill result")
    return event


def build(events: Iterable[dict[str, Any]], ref: str, kind: Kind) -> Timeline:
    """The timeline for ``ref`` from ``events`` (the API's event dicts, any order)."""
    ordered = sorted(events, key=lambda e: (e["at"], e["id"]))
    anchor = _find(ordered, ref, kind)
    return _drill(ordered, anchor) if kind == "drill" else _incident(ordered, anchor)


# -- incidents ---------------------------------------------------------------------------


def _incident(events: list[dict[str, Any]], anchor: dict[str, Any]) -> Timeline:
    t0 = anchor["at"]
    incident_subject = anchor["subject"] if anchor["kind"] == "paging.opened" else None
    window = [e for e in events if t0 - LOOKBACK_S <= e["at"] <= t0 + HORIZON_S]
    # Detection: the first probe or site going down in the run of trouble leading to the anchor.
    trouble = [e for e in window if e["at"] <= t0 and _is_trouble(e)]
    start = _run_start(trouble, t0)
    end = _incident_end(window, t0, incident_subject)
    entries = []
    for e in window:
        if not start <= e["at"] <= end:
            continue
        entries.extend(_entries(e))
    entries.sort(key=lambda x: (x.at, CATEGORIES.index(x.category) if x.category in CATEGORIES else 99))
    figures = _incident_figures(entries, start)
    title = f"Incident report: {anchor['message'] or anchor['kind']}"
    return Timeline("incident", title, anchor["id"], start, end, tuple(entries), figures)


def _is_trouble(e: dict[str, Any]) -> bool:
    data = e.get("data") or {}
    if e["kind"] == "probe.state":
        return data.get("state") == "down"
    if e["kind"] == "site.verdict":
        return data.get("verdict") in ("down", "degraded")
    return False


def _run_start(trouble: list[dict[str, Any]], t0: float) -> float:
    """The first trouble event of the last uninterrupted run (gaps over LOOKBACK_S/2 break it)."""
    if not trouble:
        return t0
    start = trouble[-1]["at"]
    for e in reversed(trouble):
        if start - e["at"] > LOOKBACK_S / 2:
            break
        start = e["at"]
    return min(start, t0)


def _incident_end(window: list[dict[str, Any]], t0: float, subject: str | None) -> float:
    """Until the incident is resolved (its pages' resolve), else the last related event in the horizon."""
    last = t0
    for e in window:
        if e["at"] < t0:
            continue
        kind = e["kind"]
        if subject is not None and e["subject"] != subject:
            continue
        if kind.startswith(("failover.", "paging.", "replication.promoted")):
            last = e["at"]
        if kind in ("paging.resolved", "failover.resolve"):
            return last
    return last


def _entries(e: dict[str, Any]) -> list[Entry]:
    kind, data, at = e["kind"], e.get("data") or {}, e["at"]
    subject, message, eid = e["subject"], e["message"], e["id"]
    if kind == "probe.state":
        return [
            Entry(
                at,
                "detection",
                f"{subject} {data.get('was', '?')} → {data.get('state', '?')}",
                message,
                event_id=eid,
            )
        ]
    if kind == "site.verdict":
        return [Entry(at, "verdict", f"site {subject}: {data.get('verdict', '?')}", message, event_id=eid)]
    if kind == "failover.decision":
        title = _decision_title(e)
        return [
            Entry(
                at,
                "decision",
                title,
                f"{message} (by {e['actor']}, epoch {data.get('epoch', '?')})",
                event_id=eid,
            )
        ]
    if kind in ("failover.runbook.failover", "failover.runbook.failback"):
        return [Entry(at, "runbook", f"{kind.rsplit('.', 1)[1]} runbook started", message, event_id=eid)]
    if kind.startswith("failover.runbook.") and kind.endswith((".done", ".failed")):
        return _runbook_steps(e)
    if kind == "failover.drill":
        return [Entry(at, "check", "drill finished", message, ok=bool(data.get("ok")), event_id=eid)]
    if kind in ("failover.page", "paging.opened", "paging.escalated") or kind.startswith("paging.page_"):
        return [Entry(at, "page", _page_title(kind, subject), message, event_id=eid, ok=_page_ok(kind))]
    if kind == "paging.acked":
        who = data.get("actor", e["actor"])
        after = data.get("after_s")
        return [
            Entry(
                at,
                "ack",
                f"{subject or 'incident'} acknowledged by {who}",
                message,
                duration_s=float(after) if after is not None else None,
                event_id=eid,
            )
        ]
    if kind in ("paging.resolved", "failover.resolve", "paging.cleared"):
        return [Entry(at, "resolve", f"{kind.split('.')[1]} {subject}".strip(), message, event_id=eid)]
    if kind == "replication.promoted":
        loss = data.get("data_loss_window_s")
        text = "unknown" if loss is None else f"{float(loss):.3f} s"
        return [
            Entry(
                at,
                "data",
                f"replica {data.get('stream', subject)} promoted",
                f"data-loss window {text}",
                event_id=eid,
            )
        ]
    if kind == "failover.verification":
        return _verification_calls(e)
    if kind == "operator.note":
        return [Entry(at, "note", f"note by {e['actor']}", message, event_id=eid)]
    return []


def _verification_calls(e: dict[str, Any]) -> list[Entry]:
    """One entry per hotline called after a routing change: at its good call's answer, else the end."""
    out = []
    for h in (e.get("data") or {}).get("hotlines", []):
        ok = bool(h.get("ok"))
        number, where = h.get("number", "?"), h.get("destination", "?")
        title = f"call {number} answered at {where}" if ok else f"call {number} FAILED"
        at = float(h["answered_at"]) if ok and h.get("answered_at") else e["at"]
        out.append(Entry(at, "call", title, str(h.get("detail", "")), ok=ok, event_id=e["id"]))
    return out


def _decision_title(e: dict[str, Any]) -> str:
    data = e.get("data") or {}
    return f"decision: {data.get('from', '?')} → {data.get('to', e['subject'])}"


def _page_title(kind: str, subject: str) -> str:
    if kind == "failover.page":
        return f"page raised: {subject}"
    return f"{kind.split('.', 1)[1].replace('_', ' ')} {subject}".strip()


def _page_ok(kind: str) -> bool | None:
    if kind in ("paging.page_failed", "paging.page_uncertain"):
        return False
    return True if kind == "paging.page_sent" else None


def _runbook_steps(e: dict[str, Any]) -> list[Entry]:
    """Steps ran one after another; each starts where the previous ended, counted back from the end."""
    data = e.get("data") or {}
    steps = data.get("steps") or []
    total = float(data.get("duration_s") or sum(float(s.get("duration_s") or 0) for s in steps))
    started = e["at"] - total
    out = []
    for s in steps:
        duration = float(s.get("duration_s") or 0.0)
        out.append(
            Entry(
                started,
                "runbook",
                f"{s.get('action', 'apply')} {s.get('actuator', '?')}",
                s.get("detail", ""),
                duration_s=duration,
                ok=bool(s.get("ok")),
                event_id=e["id"],
            )
        )
        started += duration
    ok = e["kind"].endswith(".done")
    out.append(
        Entry(
            e["at"],
            "runbook",
            f"runbook {'done' if ok else 'FAILED'}: routing {data.get('routing', '?')}",
            e["message"],
            duration_s=total,
            ok=ok,
            event_id=e["id"],
        )
    )
    return out


def _incident_figures(entries: list[Entry], start: float) -> dict[str, Any]:
    def first(category: str, pred: Any = lambda x: True) -> Entry | None:
        return next((x for x in entries if x.category == category and pred(x)), None)

    figures: dict[str, Any] = {}
    detection = first("detection") or first("verdict")
    decision = first("decision", lambda x: "failing_over" in x.title or "failing_back" in x.title) or first(
        "decision"
    )
    done = first("runbook", lambda x: x.title.startswith("runbook "))
    ack = first("ack")
    page = first("page")
    if detection:
        figures["detected_at"] = detection.at
    if decision:
        figures["decision_after_detection_s"] = round(decision.at - start, 3)
    if done:
        figures["runbook_s"] = round(done.duration_s or 0.0, 3)
        figures["runbook_ok"] = done.ok
        figures["routing_changed_after_detection_s"] = round(done.at - start, 3)
    if page:
        figures["first_page_after_detection_s"] = round(page.at - start, 3)
    if ack:
        figures["acknowledged_after_s"] = round(ack.duration_s, 3) if ack.duration_s is not None else None
        figures["acknowledged_by"] = ack.title.rsplit(" by ", 1)[-1]
    losses = [x for x in entries if x.category == "data"]
    if losses:
        figures["data_loss_window"] = {
            x.title.split()[1]: x.detail.removeprefix("data-loss window ") for x in losses
        }
    figures["pages"] = sum(1 for x in entries if x.category == "page")
    calls = [x for x in entries if x.category == "call"]
    if calls:  # the RTO as a customer measures it: the first good call per hotline, from detection
        figures["verified_by_calls"] = all(bool(x.ok) for x in calls)
        figures["first_good_call_after_detection"] = {
            x.title.split()[1]: (f"{x.at - start:.1f} s ({x.detail.split('(', 1)[-1].rstrip(')')})" if x.ok
                                 else f"none: {x.detail}")
            for x in calls
        }  # fmt: skip
    return figures


# -- drills ------------------------------------------------------------------------------


def _drill(events: list[dict[str, Any]], anchor: dict[str, Any]) -> Timeline:
    result: dict[str, Any] | None = anchor
    if anchor["kind"] == "failover.decision":
        result = next((e for e in events if e["kind"] == "failover.drill" and e["at"] >= anchor["at"]), None)
    if result is None:
        raise ReportError(f"no drill result (failover.drill) after event {anchor['id']}")
    report = result.get("data") or {}
    started = float(report.get("started_at", result["at"]))
    finished = float(report.get("finished_at", result["at"]))
    entries = [
        Entry(
            e["at"],
            "decision",
            _decision_title(e),
            f"{e['message']} (by {e['actor']})",
            event_id=e["id"],
        )
        for e in events
        if e["kind"] == "failover.decision"
        and started - DRILL_WINDOW_S <= e["at"] <= finished + DRILL_WINDOW_S
    ]
    at = started
    for check in report.get("checks", []):
        duration = float(check.get("duration_s") or 0.0)
        entries.append(
            Entry(
                at,
                "check",
                check.get("name", "?"),
                check.get("detail", ""),
                duration_s=duration,
                ok=bool(check.get("ok")),
                event_id=result["id"],
            )
        )
        at += duration
    entries.append(
        Entry(
            result["at"],
            "check",
            "drill finished",
            result["message"],
            ok=bool(report.get("ok")),
            duration_s=finished - started,
            event_id=result["id"],
        )
    )
    entries.sort(key=lambda x: x.at)
    checks = report.get("checks", [])
    figures: dict[str, Any] = {
        "ok": bool(report.get("ok")),
        "checks_passed": f"{sum(1 for c in checks if c.get('ok'))}/{len(checks)}",
        "drill_s": round(finished - started, 3),
        "production_routing_touched": report.get("production_routing_touched"),
    }
    rto = report.get("expected_rto") or {}
    if rto:
        figures["expected_rto_s"] = rto.get("total_s")
        figures["expected_rto_parts"] = {k: v for k, v in rto.items() if k != "total_s"}
    start = min([started, *(x.at for x in entries)])
    end = max([finished, *(x.at + (x.duration_s or 0) for x in entries)])
    return Timeline(
        "drill", f"Drill report: {result['message']}", result["id"], start, end, tuple(entries), figures
    )
