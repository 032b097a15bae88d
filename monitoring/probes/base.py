"""The contract every probe kind keeps: the :class:`Probe` protocol and the one result type.

Probes differ in how they ask; the prober calls each through :class:`Probe`,
and the health model, metrics and the audit log only ever see a
:class:`ProbeResult`, so a new probe kind needs no change downstream: one
module with its probe, and one line in :data:`monitoring.probes.kinds.KINDS`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

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


@dataclass(frozen=True, slots=True)
class Address:
    """Where a URL of some kind points: what :func:`monitoring.targets.parse_url` builds a target from."""

    host: str
    port: int = 0  # 0 where the kind has no port (icmp) or the URL carries it (http)
    transport: str = ""  # sip: udp|tcp|tls
    url: str = ""  # http(s): the full URL


@dataclass(frozen=True, slots=True)
class ProbeContext:
    """What the :class:`~monitoring.prober.Prober` shares with every kind's probe it creates."""

    clock: Callable[[], float]
    tls: ssl.SSLContext  # sip over TLS and https: the CA bundle of [probes] tls_ca_file
    on_unmatched: Callable[[str], None] | None  # SIP replies that match no transaction
    host: Any = None  # a monitoring.probes.host.HostProbe for host targets, if the daemon made one
    calls: asyncio.Semaphore | None = None  # test calls occupy real channels: at most this many at once
    last_calls: dict[str, Any] = field(default_factory=dict)  # the latest test call per target, for views


class ProbeTarget(Protocol):
    """What a probe reads of a target (:class:`monitoring.targets.Target` fits it)."""

    @property
    def name(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def transport(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def accept_codes(self) -> frozenset[int] | None: ...
    @property
    def expect_body(self) -> str | None: ...
    @property
    def call(self) -> Any: ...


class Probe(Protocol):
    """One kind's probe, as the prober holds it: created on first use, kept (sockets, pools), closed once.

    ``probe`` never raises for what the network does: a timeout, a refusal or
    garbage is a :class:`ProbeResult` with ``ok=False`` and a reason from
    :data:`REASONS`. It raises only for a target it cannot probe at all.
    """

    async def probe(self, target: ProbeTarget, timeout: float) -> ProbeResult: ...

    async def close(self) -> None: ...
