"""The vote contract both sides share: `GET /vote`'s document, made by the agent, judged by the appliance.

Pure: :func:`fold_round` (probe results -> :class:`WitnessView`),
:func:`render_vote` (view -> the JSON document) on the agent's side;
:func:`interpret` (HTTP status + body -> :class:`~failover.thirdvote.Vote`) on the
appliance's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from failover.thirdvote import Vote
from monitoring.health import TargetHealth, Thresholds, observe
from monitoring.probes.base import ProbeResult
from monitoring.targets import Target

log = logging.getLogger("hotsite.failover.witness")


VERSION = 1
MAX_ANSWER_BYTES = 64 * 1024  # a vote is a few hundred bytes; anything huge is not a witness
MAX_DETAIL_CHARS = 300  # the witness's words end up in our logs and audit: keep them short
MAX_NONCE_CHARS = 64
DEFAULT_MAX_AGE_S = 10.0


# ---------------------------------------------------------------------------
# Pure core of the agent: probe results -> what the witness believes


@dataclass(frozen=True, slots=True)
class WitnessView:
    """What the witness believes about the primary, and from which evidence."""

    healths: tuple[TargetHealth, ...]
    since: float  # unix time primary_alive took its current value (start time while unknown)
    primary_alive: bool | None = None
    checked_at: float | None = None  # unix time the last probe round finished
    checked_mono: float | None = None  # the same instant on the witness's monotonic clock
    rounds: int = 0


def new_view(targets: Iterable[Target], now_wall: float) -> WitnessView:
    return WitnessView(tuple(TargetHealth(t.name, t.kind) for t in targets), since=now_wall)


def primary_alive(healths: Iterable[TargetHealth]) -> bool | None:
    """True if any target is up; False only if every one is down; otherwise None."""
    states = [h.state for h in healths]
    if "up" in states:
        return True
    if states and all(s == "down" for s in states):
        return False
    return None


def fold_round(
    view: WitnessView, results: Sequence[ProbeResult], policy: Thresholds, *, now_wall: float, now_mono: float
) -> WitnessView:
    """Fold one round of probe results (any subset of the targets) into the view."""
    by_target = {r.target: r for r in results}
    unknown = set(by_target) - {h.target for h in view.healths}
    if unknown:
        raise ValueError(f"results for targets the witness does not probe: {sorted(unknown)}")
    healths = tuple(
        observe(h, by_target[h.target], policy) if h.target in by_target else h for h in view.healths
    )
    alive = primary_alive(healths)
    since = view.since if alive == view.primary_alive else now_wall
    return dataclasses.replace(
        view,
        healths=healths,
        primary_alive=alive,
        since=since,
        checked_at=now_wall,
        checked_mono=now_mono,
        rounds=view.rounds + 1,
    )


def render_vote(view: WitnessView, *, name: str, now_mono: float, nonce: str | None = None) -> dict[str, Any]:
    """The ``GET /vote`` document; ``nonce`` is the voter's, echoed so that a replay is refused."""
    age = None if view.checked_mono is None else max(0.0, now_mono - view.checked_mono)
    return {
        "version": VERSION,
        "nonce": nonce,
        "witness": name,
        "primary_alive": view.primary_alive,
        "since": view.since,
        "checked_at": view.checked_at,
        "age_s": age,
        "evidence": [
            {
                "target": h.target,
                "state": h.state,
                "reason": h.last.reason if h.last is not None else "not_probed",
                "detail": h.why,
            }
            for h in view.healths
        ],
    }


# ---------------------------------------------------------------------------
# Pure core of the voter: the witness's answer -> a Vote


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # JSON allows integers far beyond a float
        return None
    return number if math.isfinite(number) else None


def clean(text: object, limit: int = MAX_DETAIL_CHARS) -> str:
    """Printable, bounded text from whatever the witness sent."""
    shown = "".join(c if c.isprintable() else "?" for c in str(text))
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def _summary(evidence: object) -> str:
    if not isinstance(evidence, list):
        return ""
    items = []
    for item in evidence[:8]:
        if isinstance(item, dict):
            items.append(f"{clean(item.get('target'), 80)} {clean(item.get('state'), 10)}")
            reason = item.get("reason")
            if isinstance(reason, str) and reason != "ok":
                items[-1] += f" ({clean(reason, 20)})"
    return "; ".join(items)


def interpret(
    status: int,
    body: bytes,
    *,
    max_age_s: float,
    rtt_s: float,
    received_mono: float,
    received_wall: float,
    source: str,
    nonce: str | None = None,
) -> Vote:
    """Judge one answer of a witness. Total: any status and any bytes give a Vote.

    With ``nonce`` (the voter's, sent with the request), an answer that does
    not echo exactly it is refused: it was made for another request, i.e.
    replayed.
    """

    def unknown(detail: str) -> Vote:
        return Vote(None, clean(detail), received_mono, source)

    if status == 401:
        return unknown("witness refused our token (HTTP 401)")
    if status != 200:
        return unknown(f"witness answered HTTP {status}")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return unknown("witness answer is not JSON")
    if not isinstance(doc, dict):
        return unknown("witness answer is not a JSON object")
    version = doc.get("version")
    if type(version) is not int or version != VERSION:
        return unknown(f"witness speaks version {clean(version, 20)}, expected {VERSION}")
    name = doc.get("witness")
    if isinstance(name, str) and name:
        source = f"witness:{clean(name, 64)}"
    if nonce is not None and doc.get("nonce") != nonce:
        return unknown("witness answer does not carry our request's nonce: replayed or forged, refused")
    if "primary_alive" not in doc:
        return unknown("witness answer has no primary_alive")
    alive = doc["primary_alive"]
    if alive is not None and type(alive) is not bool:
        return unknown(f"witness answer has an invalid primary_alive: {clean(repr(alive), 20)}")
    raw_age = doc.get("age_s")
    age_s = _number(raw_age)
    checked_at = _number(doc.get("checked_at"))
    if raw_age is not None and (age_s is None or age_s < 0):
        return unknown(f"witness answer has an invalid age_s: {clean(repr(raw_age), 20)}")
    if age_s is not None:
        age = age_s + max(rtt_s, 0.0)  # the answer aged on the way, too
    elif checked_at is not None:
        # A witness that does not say age_s: fall back to wall clocks, which may disagree.
        age = received_wall - checked_at
        if age < -max_age_s:
            return unknown(f"witness clock is more than {max_age_s:g}s ahead of ours; cannot judge freshness")
        age = max(age, 0.0)
    elif alive is None:
        return unknown("witness has not judged the primary yet")
    else:
        return unknown("witness answer says neither age_s nor checked_at")
    if alive is None:
        return unknown("witness cannot tell yet: " + (_summary(doc.get("evidence")) or "no evidence"))
    if age > max_age_s:
        return unknown(f"witness view is stale: older than {max_age_s:g}s")
    evidence = _summary(doc.get("evidence"))
    verdict = "sees the primary" if alive else "sees the primary down"
    # No age in the detail: it stays the same while the view does, so a poller can report changes only.
    detail = f"{source.removeprefix('witness:')} {verdict}" + (f": {evidence}" if evidence else "")
    return Vote(alive, clean(detail), received_mono - age, source)
