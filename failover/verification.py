"""Every routing change verified by calls: did each hotline answer where the plan sends it, with a voice?

A runbook's read-back proves that Kamailio's tables say what was written. A
customer's experience is a call: after a failover (or failback) has been applied,
every hotline listed in ``[testcalls] hotlines`` is dialled through the carrier
edge, in priority order, as a customer would. Each must be answered *at the site
the plan names for it* (told by the answer's own identity, see
:mod:`monitoring.probes.testcall`) and with audio. A hotline that is not is
reported in the decision, paged, and shown in the incident report
("95566 not answered at backup: 503 Service Unavailable").

Bounded: every hotline gets at least one call; further calls (the edge may
still be settling, a first call may meet a transient) are placed only until
``verify_timeout_s`` has passed since the verification started. Calls run one
at a time: they occupy real channels and agents' queue slots.

The judgement is pure (:func:`judge`, :func:`expectations`); placing the calls
is the caller's (a function from an :class:`Expectation` to a call result), so
tests can run it with scripted results and a simulated clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from failover import plans
from monitoring.probes.testcall import CallResult

if TYPE_CHECKING:
    from failover.settings import FailoverConfig as Config

Kind = Literal["failover", "failback"]


@dataclass(frozen=True, slots=True)
class Expectation:
    """One hotline, and where the routing in force must send it."""

    hotline: str
    number: str
    destination: str  # a site, or an ivr/announcement/remote_agents destination
    answered_by: str | None  # the answerer's name a good call must carry ("site:backup"); None: any


@dataclass(frozen=True, slots=True)
class HotlineCheck:
    """What the calls to one hotline found: the first good call, or the last failed one."""

    expectation: Expectation
    ok: bool
    detail: str  # "95588 at backup (PDD 4 ms, MOS 4.41)" / "95566 not answered at backup: 503 …"
    attempts: int
    answered_at: float | None  # wall-clock time of the good call's answer
    call: dict[str, Any]  # the call's own record (CallResult.to_json)

    def to_json(self) -> dict[str, Any]:
        e = self.expectation
        return {
            "hotline": e.hotline,
            "number": e.number,
            "destination": e.destination,
            "expected_answerer": e.answered_by,
            "ok": self.ok,
            "detail": self.detail,
            "attempts": self.attempts,
            "answered_at": self.answered_at,
            "pdd_ms": self.call.get("pdd_answer_ms"),
            "mos": self.call.get("mos"),
            "answered_by": self.call.get("answered_by"),
            "code": self.call.get("code"),
        }


def expectations(config: Config, kind: Kind, lost: Iterable[str] = ()) -> list[Expectation]:
    """The verification calls after a ``kind`` change, in the hotlines' priority order.

    After a failback every hotline is the primary's; after a failover each goes where
    :func:`failover.plans.assign` sends it with the primary (and ``lost``) gone.
    """
    listed = set(config.testcalls.hotlines)
    ordered = [(name, line) for name, line in plans.by_priority(config.hotlines) if name in listed]
    if kind == "failback":
        primary = config.primary[0]
        return [Expectation(name, line.number, primary, f"site:{primary}") for name, line in ordered]
    assigned, _ = plans.assign(config, {config.primary[0], *lost})
    where = {a.hotline: a.destination for a in assigned}
    out = []
    for name, line in ordered:
        destination = where.get(name, "nowhere")
        answerer = f"site:{destination}" if destination in config.sites else None
        out.append(Expectation(name, line.number, destination, answerer))
    return out


def judge(expected: Expectation, call: CallResult) -> tuple[bool, str]:
    """Pure: did this call prove the hotline? (answered, with audio, by whom the plan names)."""
    where = expected.destination
    if not call.ok:
        return False, f"{expected.number} not answered at {where}: {_why(call)}"
    if expected.answered_by is not None and call.answered_by != expected.answered_by:
        return False, f"{expected.number} answered by {call.answered_by}, not at {where}"
    pdd = f"PDD {call.pdd_answer_ms:.0f} ms" if call.pdd_answer_ms is not None else "PDD ?"
    mos = f", MOS {call.mos:.2f}" if call.mos is not None else ""
    return True, f"{expected.number} at {where} ({pdd}{mos})"


def _why(call: CallResult) -> str:
    """The reason alone, without the number :attr:`CallResult.detail` starts with."""
    return call.detail.split(": ", 1)[1] if ": " in call.detail else call.detail


def summary(checks: Iterable[HotlineCheck]) -> str:
    """One line for a decision or a page: the failures first, they are what someone must act on."""
    ordered = sorted(checks, key=lambda c: c.ok)
    return "; ".join(c.detail for c in ordered) or "no hotlines listed in [testcalls] hotlines"


Placer = Callable[[Expectation], Awaitable[CallResult]]


async def verify(
    wanted: list[Expectation],
    place: Placer,
    *,
    timeout_s: float,
    retry_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> list[HotlineCheck]:
    """Call every hotline in order until it is proven or the time is up (each gets one call)."""
    pause = sleep or asyncio.sleep
    started = clock()
    results = []
    for expected in wanted:
        attempts = 0
        while True:
            call = await place(expected)
            attempts += 1
            ok, detail = judge(expected, call)
            if ok or clock() - started + retry_s >= timeout_s:
                break
            await pause(retry_s)
        answered_at = wall() - max(0.0, call.elapsed_s - (call.pdd_answer_ms or 0.0) / 1000) if ok else None
        results.append(HotlineCheck(expected, ok, detail, attempts, answered_at, call.to_json()))
    return results


def enabled(config: Config) -> bool:
    """Changes are verified by calls when hotlines are listed for test calls and it is not turned off."""
    t = config.testcalls
    return bool(t.verify_changes and t.hotlines and config.kamailio.sip)


# What the failover service calls after a change: (kind, the lost backup sites) -> one check per hotline.
Verifier = Callable[[Kind, tuple[str, ...]], Awaitable[list[HotlineCheck]]]


def caller(config: Callable[[], Config]) -> Verifier:
    """The daemon's verifier: real calls through the carrier edge with the ``[testcalls]`` settings,
    read from the configuration in force when the change is made (a reload may change them)."""
    from monitoring.probes.testcall import place_call
    from monitoring.targets import call_spec

    async def run(kind: Kind, lost: tuple[str, ...]) -> list[HotlineCheck]:
        cfg = config()
        edge = cfg.kamailio.sip or ""

        async def place(expected: Expectation) -> CallResult:
            return await place_call(call_spec(cfg, f"verify:{expected.hotline}", expected.number, edge))

        wanted = expectations(cfg, kind, lost)
        return await verify(wanted, place, timeout_s=cfg.testcalls.verify_timeout_s)

    return run
