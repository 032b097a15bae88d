"""ICMP echo probe, unprivileged where the kernel allows, raw otherwise.

Linux lets ordinary users send echo requests over "ping sockets" when their
group is inside ``net.ipv4.ping_group_range``; elsewhere a raw socket needs
CAP_NET_RAW, which the systemd unit grants. The first probe finds out which
works and remembers it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import icmplib

from monitoring.probes.base import ProbeResult


class IcmpProbe:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._privileged: bool | None = None  # unknown until the first probe

    async def probe(self, target: str, host: str, *, timeout: float = 1.0) -> ProbeResult:
        try:
            reply = await self._ping(host, timeout)
        except icmplib.SocketPermissionError:
            return self._fail(
                target, "error", "no permission for ICMP: needs CAP_NET_RAW or ping_group_range"
            )
        except icmplib.NameLookupError:
            return self._fail(target, "unreachable", f"cannot resolve {host}")
        except (icmplib.ICMPLibError, OSError) as exc:
            return self._fail(target, "unreachable", str(exc) or type(exc).__name__)
        if not reply.is_alive:
            return self._fail(target, "timeout", f"no echo reply in {timeout:g}s")
        return ProbeResult(target, True, self._clock(), reply.avg_rtt / 1000.0, None, "ok", "echo reply")

    async def _ping(self, host: str, timeout: float) -> icmplib.Host:
        if self._privileged is None:
            try:
                reply = await icmplib.async_ping(host, count=1, timeout=timeout, privileged=False)
                self._privileged = False
                return reply
            except icmplib.SocketPermissionError:
                self._privileged = True
        return await icmplib.async_ping(host, count=1, timeout=timeout, privileged=self._privileged)

    def _fail(self, target: str, reason: str, detail: str) -> ProbeResult:
        return ProbeResult(target, False, self._clock(), None, None, reason, detail)
