"""The one result type every probe returns.

Probes differ in how they ask; the health model, metrics and the audit log
only ever see this record, so a new probe kind needs no change downstream.
"""

from __future__ import annotations

from dataclasses import dataclass

# Bounded vocabulary for ``ProbeResult.reason``: it becomes a metric label.
REASONS = frozenset(
    {"ok", "timeout", "unreachable", "bad_code", "bad_body", "send_error", "refused", "threshold", "error"}
)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One observation of one target."""

    target: str  # the probe target's name, e.g. "trunk:carrier-a"
    ok: bool
    at: float  # monotonic clock time the result was taken
    rtt_s: float | None  # round-trip time when a reply arrived
    code: int | None  # SIP status code of the final reply, if any
    reason: str  # short machine word, one of REASONS
    detail: str = ""  # human detail, e.g. "503 Service Unavailable"
