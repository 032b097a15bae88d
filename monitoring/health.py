"""The health model: turns probe observations into judged states, per target and per site.

Pure: ``observe(health, result, policy) -> health`` and
``judge_site(previous, healths, policy, now) -> verdict`` take the previous
state and return the new one; nothing here reads a clock or does I/O, so
every judgement is reproducible under a simulated clock.

Per target, three rules, in order:

1. **rise/fall**: the evidence is ``up`` after ``rise`` consecutive
   successes and ``down`` after ``fall`` consecutive failures, as HAProxy and
   Kamailio's dispatcher do: one lost packet must never move a bank's phone
   lines.
2. **damping**: the published state changes at most once per ``damping_s``;
   evidence that flips faster waits (``pending``) and is published at the
   first observation after the dwell, if it still holds.
3. **explanation**: every published transition carries a ``why``.

Per site, a verdict from several independent vantage points (different
probe kinds): ``down`` only when every known target is down and at least
``min_evidence`` different kinds agree; ``degraded`` when some are down (a
grey failure: the SBC answers but the ACD does not), ``up`` when all are up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from appliance import timefmt
from monitoring.probes.base import ProbeResult

State = Literal["unknown", "up", "down"]
Verdict = Literal["unknown", "up", "degraded", "down"]


@dataclass(frozen=True, slots=True)
class Thresholds:
    rise: int = 2
    fall: int = 3
    damping_s: float = 0.0
    min_evidence: int = 2

    def __post_init__(self) -> None:
        if self.rise < 1:
            raise ValueError(f"rise must be >= 1, got {self.rise}")
        if self.fall < 1:
            raise ValueError(f"fall must be >= 1, got {self.fall}")
        if self.damping_s < 0:
            raise ValueError(f"damping_s must be >= 0, got {self.damping_s}")
        if self.min_evidence < 1:
            raise ValueError(f"min_evidence must be >= 1, got {self.min_evidence}")


@dataclass(frozen=True, slots=True)
class TargetHealth:
    """What the appliance believes about one target, and why."""

    target: str
    kind: str = "sip"
    state: State = "unknown"  # published (damped) state
    since: float | None = None  # when ``state`` was entered (monotonic seconds)
    evidence: State = "unknown"  # what rise/fall alone says; differs from state while damped
    successes: int = 0  # consecutive
    failures: int = 0  # consecutive
    last: ProbeResult | None = None
    transitions: int = 0
    why: str = "not probed yet"  # why the published state is what it is

    @property
    def pending(self) -> bool:
        """The evidence says otherwise, but damping holds the published state."""
        return self.evidence != self.state and self.evidence != "unknown"

    @property
    def reason(self) -> str:
        """A short human reason for the current state and the latest observation."""
        if self.last is None:
            return "not probed yet"
        if self.last.ok:
            text = f"{self.successes} consecutive successes"
        else:
            detail = f" ({self.last.detail})" if self.last.detail else ""
            text = f"{self.failures} consecutive failures: {self.last.reason}{detail}"
        return text + (f"; {self.evidence} held back by damping" if self.pending else "")


def observe(health: TargetHealth, result: ProbeResult, policy: Thresholds) -> TargetHealth:
    """Fold one probe result into the target's health."""
    if result.target != health.target:
        raise ValueError(f"result for {result.target!r} given to the health of {health.target!r}")
    if result.ok:
        successes, failures = health.successes + 1, 0
    else:
        successes, failures = 0, health.failures + 1
    evidence = health.evidence
    if successes >= policy.rise:
        evidence = "up"
    elif failures >= policy.fall:
        evidence = "down"
    state, since, why, transitions = health.state, health.since, health.why, health.transitions
    dwelt = since is None or health.state == "unknown" or result.at - since >= policy.damping_s
    if evidence != state and evidence != "unknown" and dwelt:
        state, since, transitions = evidence, result.at, transitions + 1
        why = _why(evidence, successes, failures, result, health.kind)
    elif since is None:
        since = result.at
    return dataclasses.replace(
        health,
        state=state,
        since=since,
        evidence=evidence,
        successes=successes,
        failures=failures,
        last=result,
        transitions=transitions,
        why=why,
    )


def _why(state: State, successes: int, failures: int, result: ProbeResult, kind: str = "") -> str:
    if kind == "testcall":  # the evidence is a call: say so, with the call's own words
        if state == "up":
            return f"calls ok: {successes} good test call(s), last {result.detail}"
        return f"calls failing: {failures} failed test call(s), last {result.detail}"
    if state == "up":
        return f"{successes} consecutive successes" + (f" ({result.detail})" if result.detail else "")
    detail = f": {result.detail}" if result.detail else ""
    return f"{failures} consecutive failures, last {result.reason}{detail}"


def with_calls(options: TargetHealth, calls: TargetHealth | None) -> tuple[str, str]:
    """A trunk's (state, why) from its OPTIONS health and its test calls' health.

    A trunk that answers OPTIONS but whose test calls are judged down is the
    classic carrier failure keepalives cannot see: ``degraded``, ``calls failing``.
    """
    if calls is None or options.state != "up" or calls.state != "down":
        return options.state, options.why
    if calls.last is None or calls.last.ok:  # down, but the latest call was good: rise not reached yet
        return "degraded", calls.why
    return "degraded", f"calls failing: {calls.failures} failed test call(s), last {calls.last.detail}"


# ---------------------------------------------------------------------------
# Site verdicts


@dataclass(frozen=True, slots=True)
class SiteVerdict:
    site: str
    verdict: Verdict = "unknown"
    since: float | None = None
    why: tuple[str, ...] = ("no evidence yet",)
    down: tuple[str, ...] = ()  # targets judged down
    up: tuple[str, ...] = ()  # targets judged up
    kinds_down: tuple[str, ...] = ()  # distinct probe kinds among the down targets
    grey: bool = False  # down because the site says it cannot serve, not because it is unreachable


# Results that mean "it answered, and the answer was no": the site is reachable and says so.
ANSWERED_NO = ("bad_code", "bad_body")


def judge_site(
    previous: SiteVerdict,
    healths: Iterable[TargetHealth],
    policy: Thresholds,
    now: float,
    critical: frozenset[str] = frozenset(),
    wall_now: float | None = None,
    calls: str | None = None,
) -> SiteVerdict:
    """Combine a site's targets into one verdict that says why.

    *now* is the monotonic clock the targets' ``since`` were stamped with; the
    why-text names the wall-clock time a target went down when *wall_now*
    (the Unix time read together with *now*) is given, else how long ago: a
    monotonic reading is never shown as if it were a time.

    A *critical* target (the site's own health endpoint, an ACD check) that
    is down because it answered "unhealthy" makes the site down on its own:
    a grey failure, where the SBC still answers but nobody can take calls.
    Unreachable, it is only one more piece of evidence.

    *calls*, when given, is why the test calls to hotlines this site serves are
    critical evidence (:mod:`monitoring.callevidence`): the site answered the
    calls and refused them, a grey failure too.
    """
    healths = list(healths)
    grey = [
        h
        for h in healths
        if h.target in critical and h.state == "down" and h.last is not None and h.last.reason in ANSWERED_NO
    ]
    if grey or calls:
        return _grey(previous, grey, now, calls)
    known = [h for h in healths if h.state != "unknown"]
    down = sorted(h.target for h in known if h.state == "down")
    up = sorted(h.target for h in known if h.state == "up")
    kinds_down = sorted({h.kind for h in known if h.state == "down"})
    since_of = {h.target: _down_since(h.since, now, wall_now) for h in known}
    verdict: Verdict
    if not known:
        verdict, why = "unknown", ["no target of this site has been judged yet"]
    elif not down:
        verdict, why = "up", [f"all {len(up)} targets up"]
    elif up:
        verdict = "degraded"
        why = [f"{t} down {since_of[t]}" for t in down] + [f"{len(up)} other target(s) up"]
    elif len(kinds_down) >= policy.min_evidence:
        verdict = "down"
        why = [f"{t} down {since_of[t]}" for t in down]
        why.append(f"{len(kinds_down)} independent kinds of evidence agree ({', '.join(kinds_down)})")
    else:
        verdict = "degraded"
        why = [f"{t} down {since_of[t]}" for t in down]
        why.append(
            f"only {len(kinds_down)} kind of evidence ({', '.join(kinds_down)}); "
            f"{policy.min_evidence} must agree to judge the site down"
        )
    same = verdict == previous.verdict and not previous.grey
    since = previous.since if same and previous.since is not None else now
    return SiteVerdict(
        site=previous.site,
        verdict=verdict,
        since=since,
        why=tuple(why),
        down=tuple(down),
        up=tuple(up),
        kinds_down=tuple(kinds_down),
    )


def _down_since(since: float | None, now: float, wall_now: float | None) -> str:
    """``since 21:57:31 UTC (12 s)`` with a wall clock, else ``for 12 s``."""
    if since is None:
        return "(since unknown)"
    if wall_now is None:
        return f"for {timefmt.age(now - since)}"
    return timefmt.since(timefmt.wall_from_monotonic(since, now, wall_now), wall_now)


def _grey(previous: SiteVerdict, grey: list[TargetHealth], now: float, calls: str | None) -> SiteVerdict:
    why = [
        f"{h.target} says the site cannot serve ({h.last.detail if h.last else 'unhealthy'}): grey failure"
        for h in grey
    ]
    if calls:
        why.append(f"{calls}: grey failure")
    since = previous.since if previous.verdict == "down" and previous.grey and previous.since else now
    return SiteVerdict(
        site=previous.site,
        verdict="down",
        since=since,
        why=tuple(why),
        down=tuple(sorted(h.target for h in grey)),
        kinds_down=tuple(sorted({h.kind for h in grey} | ({"testcall"} if calls else set()))),
        grey=True,
    )
