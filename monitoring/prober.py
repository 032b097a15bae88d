"""One entry point for probing any target, whatever its kind.

The daemon's scheduler and the ``hotsite probe`` command both call
:meth:`Prober.probe`; each kind's probe keeps its own long-lived state
(sockets, HTTP connection pool), created on first use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from appliance.errors import ConfigError
from monitoring.probes.base import ProbeResult
from monitoring.probes.host import HostProbe
from monitoring.probes.http import HttpProbe
from monitoring.probes.icmp import IcmpProbe
from monitoring.probes.sip import SipOptionsProbe
from monitoring.probes.tcp import TcpConnectProbe
from monitoring.probes.testcall import CallResult, TestCall
from monitoring.targets import Target


def _any_final(code: int) -> bool:
    return True


class Prober:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_unmatched: Callable[[str], None] | None = None,
        host: HostProbe | None = None,
        tls_ca_file: Path | None = None,
        max_calls: int = 2,
    ) -> None:
        self._clock = clock
        self._host = host
        try:
            self._tls = ssl.create_default_context(cafile=str(tls_ca_file) if tls_ca_file else None)
        except (OSError, ssl.SSLError) as exc:  # a missing CA file is the user's mistake, not a crash
            raise ConfigError(
                f"probes.tls_ca_file: cannot load {tls_ca_file}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        self._on_unmatched = on_unmatched
        self._sip: SipOptionsProbe | None = None
        self._http: HttpProbe | None = None
        self._tcp: TcpConnectProbe | None = None
        self._icmp: IcmpProbe | None = None
        self._patterns: dict[str, re.Pattern[str]] = {}
        # Test calls occupy real channels: at most this many at once, whatever the scheduler allows.
        self._calls = asyncio.Semaphore(max_calls)
        self.last_calls: dict[str, CallResult] = {}  # the latest test call per target, for views

    async def probe(self, target: Target, timeout: float) -> ProbeResult:
        if target.kind == "sip":
            return await self._probe_sip(target, timeout)
        if target.kind == "http":
            self._http = self._http or HttpProbe(clock=self._clock, verify=self._tls)
            return await self._http.probe(
                target.name, target.url, timeout=timeout, body_pattern=self._pattern(target.expect_body)
            )
        if target.kind == "tcp":
            self._tcp = self._tcp or TcpConnectProbe(clock=self._clock)
            return await self._tcp.probe(target.name, target.host, target.port, timeout=timeout)
        if target.kind == "host":
            if self._host is None:
                raise ValueError("host targets need a HostProbe")
            return self._host.probe(target.name, target.host)
        if target.kind == "testcall":
            return await self._probe_call(target)
        if target.kind == "icmp":
            self._icmp = self._icmp or IcmpProbe(clock=self._clock)
            return await self._icmp.probe(target.name, target.host, timeout=timeout)
        raise ValueError(f"unknown target kind {target.kind!r}")

    async def _probe_sip(self, target: Target, timeout: float) -> ProbeResult:
        # The probe reports every final reply; which codes count as alive is
        # the target's business (default any 2xx; 408 never, the probe enforces that).
        self._sip = self._sip or SipOptionsProbe(
            accept=_any_final, clock=self._clock, on_unmatched=self._on_unmatched, ssl_context=self._tls
        )
        if target.transport and target.transport != "udp":
            result = await self._sip.probe(
                target.name, target.host, target.port, timeout=timeout, transport=target.transport
            )
        else:
            result = await self._sip.probe(target.name, target.host, target.port, timeout=timeout)
        if result.code is None or result.code < 200:
            return result
        alive = result.code in target.accept_codes if target.accept_codes else 200 <= result.code < 300
        if alive == result.ok:
            return result
        if alive:
            return dataclasses.replace(result, ok=True, reason="ok")
        return dataclasses.replace(result, ok=False, reason="bad_code")

    async def _probe_call(self, target: Target) -> ProbeResult:
        if target.call is None:
            raise ValueError(f"testcall target {target.name} has no call to place")
        async with self._calls:  # waiting for a slot counts against the target's timeout
            result = await TestCall(target.call, clock=self._clock).run()
        self.last_calls[target.name] = result
        return result.to_probe()

    def _pattern(self, expression: str | None) -> re.Pattern[str] | None:
        if expression is None:
            return None
        if expression not in self._patterns:
            self._patterns[expression] = re.compile(expression)
        return self._patterns[expression]

    async def close(self) -> None:
        if self._sip is not None:
            await self._sip.close()
        if self._http is not None:
            await self._http.close()
