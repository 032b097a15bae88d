"""Test calls as critical evidence for the site that serves a hotline (issue 20).

A site whose SBC answers OPTIONS and whose health URL says "healthy" can still
fail every call (INVITEs rejected with 503, answered without audio): the grey
failure only a call reveals. With ``[testcalls] site_critical_failures = N``,
N consecutive failed test calls to hotlines served by one site, all within
``site_critical_window_s``, judge that site down (grey: it answered, and the
answer was no), and routing moves like on any other critical evidence.

Pure: :func:`fold` adds one call's outcome to a site's run of failures and
:func:`critical` says whether the run is critical evidence at ``now``; the
monitor feeds them and the clock is the caller's. Never on a blip: one failed
call, or failures spread wider than the window, are not evidence; one good call
at the site ends the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CallPolicy:
    failures: int = 0  # consecutive failed calls that make the site down; 0: test calls never do
    window_s: float = 600.0  # the run must fit in it, and lapses once no failure is this recent

    def __post_init__(self) -> None:
        if self.failures < 0:
            raise ValueError(f"site_critical_failures must be >= 0, got {self.failures}")
        if self.window_s <= 0:
            raise ValueError(f"site_critical_window_s must be > 0, got {self.window_s}")


@dataclass(frozen=True, slots=True)
class FailedCall:
    at: float  # monotonic seconds: when the call was placed
    number: str  # the hotline's number
    what: str  # "503", "no audio", "timeout": what a customer would have met


@dataclass(frozen=True, slots=True)
class SiteCalls:
    """The latest consecutive failed test calls to hotlines this site serves (oldest first)."""

    site: str
    failures: tuple[FailedCall, ...] = ()


def failed_at(site: str, ok: bool, reason: str, code: int | None, answered_by: str | None) -> str | None:
    """What a test call to a hotline ``site`` serves says of that site: None if it proved the site.

    A call answered with audio *by another site* ("site:backup", told by the answer's own
    identity) failed at the serving site too: the carrier edge's own fallback (Kamailio's
    ``ds_next_dst``) hides the serving site's refusal from the caller, not from the answer.
    An answerer that names no configured site cannot be judged: it counts as good.
    """
    if ok:
        elsewhere = (
            answered_by is not None and answered_by.startswith("site:") and answered_by != f"site:{site}"
        )
        return f"answered at {answered_by.removeprefix('site:')}" if elsewhere and answered_by else None
    if reason in ("rejected", "bad_code") and code:
        return str(code)
    return reason.replace("_", " ")


def fold(calls: SiteCalls, failed: FailedCall | None, policy: CallPolicy) -> SiteCalls:
    """One test call at this site: ``None`` for a good call (it ends the run), else the failure.

    Only the latest ``policy.failures`` are kept: older ones can no longer change the judgement.
    """
    if failed is None or policy.failures == 0:
        return dataclasses.replace(calls, failures=())
    return dataclasses.replace(calls, failures=(*calls.failures, failed)[-policy.failures :])


def critical(calls: SiteCalls, policy: CallPolicy, now: float) -> str | None:
    """Why the site's test calls are critical evidence now, or None.

    ``test calls to 95588 failing at primary: 503 ×3`` when the last ``failures``
    calls all failed within ``window_s`` of each other and the latest is not
    older than ``window_s`` (evidence lapses: after a failover no calls reach the
    old site, and it must not be held down for ever by calls of long ago).
    """
    n = policy.failures
    if n == 0 or len(calls.failures) < n:
        return None
    run = calls.failures[-n:]
    if run[-1].at - run[0].at > policy.window_s or now - run[-1].at > policy.window_s:
        return None
    numbers = list(dict.fromkeys(f.number for f in run))
    counts: dict[str, int] = {}
    for f in run:
        counts[f.what] = counts.get(f.what, 0) + 1
    what = ", ".join(f"{text} ×{count}" for text, count in counts.items())
    return f"test calls to {', '.join(numbers)} failing at {calls.site}: {what}"


def lapses_at(calls: SiteCalls, policy: CallPolicy) -> float | None:
    """When a run judged critical stops being evidence without a new call (None: no run)."""
    if policy.failures == 0 or len(calls.failures) < policy.failures:
        return None
    return calls.failures[-1].at + policy.window_s
