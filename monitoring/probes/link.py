"""Link state of the appliance's own interfaces, from netlink events.

Not polled: the kernel tells us (RTM_NEWLINK / RTM_DELLINK) the moment a
cable is pulled or a switch port goes down, so a link change is seen in
milliseconds. Each event becomes a ProbeResult for ``link:<ifname>``; the
health model treats link evidence as definitive (rise = fall = 1).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK

from appliance.logs import kv
from monitoring.probes.base import ProbeResult

log = logging.getLogger(f"hotsite.{__name__}")

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000


def link_result(name: str, msg: Any, at: float) -> ProbeResult:
    """Judge one RTM_NEWLINK/RTM_DELLINK message (pure, for tests)."""
    target = f"link:{name}"
    if msg.get("event") == "RTM_DELLINK":
        return ProbeResult(target, False, at, None, None, "unreachable", "interface removed")
    flags = int(msg.get("flags", 0))
    operstate = str(msg.get("operstate") or "UNKNOWN")
    if not flags & IFF_UP:
        return ProbeResult(
            target, False, at, None, None, "unreachable", f"administratively down ({operstate})"
        )
    if not flags & IFF_LOWER_UP or operstate in ("DOWN", "LOWERLAYERDOWN", "NOTPRESENT"):
        return ProbeResult(target, False, at, None, None, "unreachable", f"no carrier ({operstate})")
    return ProbeResult(target, True, at, None, None, "ok", f"carrier up ({operstate})")


class LinkMonitor:
    """Reports the state of ``interfaces`` at start and on every change until cancelled."""

    def __init__(
        self,
        interfaces: Iterable[str],
        on_result: Callable[[ProbeResult], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interfaces = frozenset(interfaces)
        self._on_result = on_result
        self._clock = clock
        self.ready = asyncio.Event()  # set once the initial state was reported

    async def run(self) -> None:
        if not self.interfaces:
            self.ready.set()
            return
        async with AsyncIPRoute() as ipr:
            await ipr.bind(groups=RTMGRP_LINK)
            seen = set()
            async for msg in await ipr.link("dump"):
                name = msg.get("ifname")
                if name in self.interfaces:
                    seen.add(name)
                    self._emit(name, msg)
            for name in sorted(self.interfaces - seen):
                self._on_result(
                    ProbeResult(
                        f"link:{name}", False, self._clock(), None, None, "unreachable", "no such interface"
                    )
                )
            self.ready.set()
            while True:
                async for msg in ipr.get():
                    if msg.get("event") in ("RTM_NEWLINK", "RTM_DELLINK"):
                        name = msg.get("ifname")
                        if name in self.interfaces:
                            self._emit(name, msg)

    def _emit(self, name: str, msg: Any) -> None:
        result = link_result(name, msg, self._clock())
        log.debug("link event", extra=kv(interface=name, ok=result.ok, detail=result.detail))
        self._on_result(result)
