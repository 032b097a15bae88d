"""The netlink actuator: a service address that follows the routing, announced by gratuitous ARP.

Where a site's service address (the SBC's signalling address, a PBX's trunk
address) must move with the routing, this actuator adds it to ``interface``
when the routing's name is ``serve_on`` and removes it otherwise, through
rtnetlink (pyroute2).

Stale ARP after a takeover is the top complaint about keepalived: the
neighbours keep sending to the old MAC until their entries age out. So every
time this actuator *takes* the address (added now, or first apply of that
routing by this process, e.g. after a daemon restart mid-runbook) it sends
``garp_count`` gratuitous ARP requests ``garp_interval_s`` apart. The frame
is written by hand on an AF_PACKET socket (no library does it well, and
``arping`` would be one more process to supervise); the first goes out
before ``apply`` returns, the rest from a background task so the runbook is
not held for ``garp_count × garp_interval_s``. A later apply or ``close()``
cancels the remaining ones.

Needs CAP_NET_ADMIN (addresses) and CAP_NET_RAW (the packet socket).
``netns`` (tests, the lab) runs both in a named network namespace.

Tokens: the newest token obeyed (or fenced) is kept in memory and, with
``token_file`` (the daemon gives ``<state_dir>/actuators/<name>.token``), in a
file that never goes down (:mod:`failover.actuators.tokenfile`). Every
apply checks it *before touching the kernel*, so after ``fence(token)`` no
older decision moves the address or the routes on this host, even one that
a pause held in flight, and even from a daemon restarted since. The kernel
itself cannot check tokens: what the fence does not reach is another host
adding the same address; that is what the lease upstream is for.
Routes (``routes = ["10.9.0.0/16 via 192.0.2.1", "198.51.100.0/24"]``) follow
the address: added through ``interface`` after the address when this side
serves, removed before it when it does not, and read back by ``verify``
(destination, gateway and interface). A route with a gateway needs the
gateway on a network the interface reaches (the service address's own
prefix will do); otherwise the kernel's refusal is the step's error.

IPv4 only (the config refuses IPv6: unsolicited neighbour advertisements
are not written yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import socket
import struct
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from appliance.logs import kv
from failover.actuators.base import Actuator, ActuatorError, StaleToken
from failover.actuators.tokenfile import raise_token
from failover.routing import Routing
from failover.settings import parse_route

log = logging.getLogger(f"hotsite.{__name__}")

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
BROADCAST = b"\xff" * 6


def garp_frame(mac: bytes, ip: ipaddress.IPv4Address) -> bytes:
    """A gratuitous ARP request: "who has <ip>? tell <ip>", from ``mac`` to everyone.

    Sender and target protocol address are both ``ip`` (RFC 5227 "ARP
    Announcement"); target hardware address zero. A request rather than a
    reply, because every stack updates an existing entry from it (Linux also
    creates one when ``arp_accept`` is set).
    """
    if len(mac) != 6:
        raise ValueError(f"expected a 6-byte MAC address, got {len(mac)} bytes")
    eth = BROADCAST + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, 1) + mac + ip.packed + b"\x00" * 6 + ip.packed
    return eth + arp


class NetlinkActuator(Actuator):
    def __init__(
        self,
        address: str,
        interface: str,
        *,
        serve_on: str = "failover",
        garp_count: int = 5,
        garp_interval_s: float = 1.0,
        routes: tuple[str, ...] | list[str] = (),
        netns: str | None = None,
        timeout_s: float = 5.0,
        name: str = "netlink",
        token_file: Path | None = None,
    ) -> None:
        self.address = ipaddress.IPv4Interface(address if "/" in address else f"{address}/32")
        self.routes = [parse_route(r) for r in routes]
        self.interface = interface
        self.serve_on = serve_on
        self.garp_count = garp_count
        self.garp_interval_s = garp_interval_s
        self.netns = netns
        self.timeout_s = timeout_s
        self.name = name
        self.highest_token = 0
        self.token_file = token_file
        self._announced_for: str | None = None
        self._garp_task: asyncio.Task[None] | None = None
        self.garps_sent = 0  # for metrics and tests
        self._lock = asyncio.Lock()

    def _where(self) -> str:
        return f"{self.interface}" + (f" (netns {self.netns})" if self.netns else "")

    # ------------------------------------------------------------------ contract
    async def apply(self, routing: Routing, token: int) -> None:
        if token < self.highest_token:
            raise StaleToken(f"{self.name}: token {token} is older than {self.highest_token}, already obeyed")
        async with self._lock:
            await self._record(token, "apply")  # before the kernel is touched
            wanted = routing.kind == self.serve_on
            try:
                async with asyncio.timeout(self.timeout_s):
                    if not wanted:
                        await asyncio.to_thread(self._set_routes, False)
                    changed, mac = await asyncio.to_thread(self._set_address, wanted)
                    if wanted:
                        await asyncio.to_thread(self._set_routes, True)
                    if not wanted:
                        self._stop_garp()
                        self._announced_for = None
                    elif changed or self._announced_for != routing.name:
                        self._stop_garp()
                        if self.garp_count > 0:
                            await asyncio.to_thread(self._send_garp, mac, 1)
                            self._announced_for = routing.name
                            if self.garp_count > 1:
                                self._garp_task = asyncio.create_task(self._repeat_garp(mac))
            except TimeoutError:
                raise ActuatorError(f"{self.name}: apply took longer than {self.timeout_s:g}s") from None
            except (OSError, NetlinkError) as exc:
                raise ActuatorError(f"{self.name}: {self.address} on {self._where()}: {_why(exc)}") from None
            log.info(
                "service address %s",
                "held" if wanted else "released",
                extra=kv(
                    actuator=self.name, address=str(self.address), interface=self.interface, changed=changed
                ),
            )

    async def fence(self, token: int) -> None:
        async with self._lock:
            await self._record(token, "fence")

    async def _record(self, token: int, what: str) -> None:
        """Refuse a token older than the newest obeyed (memory and file); record ``token``."""
        try:
            async with asyncio.timeout(self.timeout_s):
                recorded = token
                if self.token_file is not None:
                    recorded = await asyncio.to_thread(
                        raise_token, self.token_file, token, wait_s=self.timeout_s / 2
                    )
        except TimeoutError:
            why = f"the token file took longer than {self.timeout_s:g}s"
            raise ActuatorError(f"{self.name}: {what}: {why}") from None
        except (OSError, ValueError) as exc:
            raise ActuatorError(f"{self.name}: {what}: token file {self.token_file}: {exc}") from None
        newest = max(recorded, self.highest_token)
        if token < newest:
            raise StaleToken(f"{self.name}: {what}: token {token} is older than {newest}, already obeyed")
        self.highest_token = token

    async def verify(self, routing: Routing) -> list[str]:
        wanted = routing.kind == self.serve_on
        try:
            async with asyncio.timeout(self.timeout_s):
                present = await asyncio.to_thread(self._present)
                routes = await asyncio.to_thread(self._routes_held)
        except TimeoutError:
            raise ActuatorError(f"{self.name}: verify took longer than {self.timeout_s:g}s") from None
        except (OSError, NetlinkError) as exc:
            raise ActuatorError(f"{self.name}: {self.address} on {self._where()}: {_why(exc)}") from None
        diffs = []
        if wanted and not present:
            diffs.append(
                f"service address {self.address} missing from {self._where()} (routing {routing.name!r})"
            )
        if present and not wanted:
            diffs.append(
                f"service address {self.address} is on {self._where()} but routing {routing.name!r}"
                f" serves it elsewhere (held here only in {self.serve_on!r})"
            )
        for (dst, gateway), held in zip(self.routes, routes, strict=True):
            text = f"route {dst}" + (f" via {gateway}" if gateway else "")
            if wanted and not held:
                diffs.append(f"{text} missing from {self._where()} (routing {routing.name!r})")
            elif held and not wanted:
                diffs.append(f"{text} is on {self._where()} but routing {routing.name!r} serves it elsewhere")
        return diffs

    async def close(self) -> None:
        self._stop_garp()

    # ------------------------------------------------------------------ internals
    def _iproute(self) -> IPRoute:
        return IPRoute(netns=self.netns) if self.netns else IPRoute()

    def _index(self, ipr: IPRoute) -> int:
        found = ipr.link_lookup(ifname=self.interface)
        if not found:
            raise OSError(errno.ENODEV, "no such interface")
        return int(found[0])

    def _addresses(self, ipr: IPRoute, index: int) -> set[ipaddress.IPv4Interface]:
        held = set()
        for msg in ipr.get_addr(index=index, family=socket.AF_INET):
            held.add(ipaddress.IPv4Interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}"))
        return held

    def _present(self) -> bool:
        with self._iproute() as ipr:
            return self.address in self._addresses(ipr, self._index(ipr))

    def _set_address(self, wanted: bool) -> tuple[bool, bytes]:
        """Add or remove the address; (whether anything changed, the interface's MAC)."""
        with self._iproute() as ipr:
            index = self._index(ipr)
            link = ipr.get_links(index)[0]
            mac = bytes.fromhex(str(link.get_attr("IFLA_ADDRESS") or "00:00:00:00:00:00").replace(":", ""))
            present = self.address in self._addresses(ipr, index)
            ip, prefix = str(self.address.ip), self.address.network.prefixlen
            try:
                if wanted and not present:
                    ipr.addr("add", index=index, address=ip, prefixlen=prefix)
                    return True, mac
                if present and not wanted:
                    ipr.addr("del", index=index, address=ip, prefixlen=prefix)
                    return True, mac
            except NetlinkError as exc:
                # Someone else got there between our read and our write: the result is what we want.
                if exc.code not in (errno.EEXIST, errno.EADDRNOTAVAIL):
                    raise
            return False, mac

    def _route_held(self, ipr: IPRoute, index: int, dst: ipaddress.IPv4Network, gateway: Any) -> bool:
        # A dump of the main table, filtered here: asking the kernel for ``dst`` would be a
        # route *lookup* (like ``ip route get``), which fails when no route exists.
        for msg in ipr.get_routes(family=socket.AF_INET, table=254):
            if msg["dst_len"] != dst.prefixlen or msg.get_attr("RTA_DST") != str(dst.network_address):
                continue
            if msg.get_attr("RTA_OIF") != index:
                continue
            if gateway is None or msg.get_attr("RTA_GATEWAY") == str(gateway):
                return True
        return False

    def _routes_held(self) -> list[bool]:
        if not self.routes:
            return []
        with self._iproute() as ipr:
            index = self._index(ipr)
            return [self._route_held(ipr, index, dst, gateway) for dst, gateway in self.routes]

    def _set_routes(self, wanted: bool) -> None:
        """Add (replace) or remove every route through ``interface``; already so is fine."""
        if not self.routes:
            return
        with self._iproute() as ipr:
            index = self._index(ipr)
            for dst, gateway in self.routes:
                spec: dict[str, Any] = {"dst": str(dst), "oif": index}
                if gateway is not None:
                    spec["gateway"] = str(gateway)
                if wanted:
                    ipr.route("replace", **spec)
                elif self._route_held(ipr, index, dst, gateway):
                    try:
                        ipr.route("del", **spec)
                    except NetlinkError as exc:
                        if exc.code != errno.ESRCH:  # gone meanwhile: that is what we want
                            raise

    def _send_garp(self, mac: bytes, count: int) -> None:
        frame = garp_frame(mac, self.address.ip)
        sock = (
            pyroute2_netns.create_socket(
                self.netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)
            )
            if self.netns
            else socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        )
        with sock:
            sock.bind((self.interface, 0))
            for _ in range(count):
                sock.send(frame)
                self.garps_sent += 1

    async def _repeat_garp(self, mac: bytes) -> None:
        for _ in range(self.garp_count - 1):
            await asyncio.sleep(self.garp_interval_s)
            try:
                await asyncio.to_thread(self._send_garp, mac, 1)
            except OSError as exc:
                log.warning(
                    "gratuitous ARP not sent",
                    extra=kv(actuator=self.name, interface=self.interface, error=_why(exc)),
                )

    def _stop_garp(self) -> None:
        if self._garp_task is not None and not self._garp_task.done():
            self._garp_task.cancel()
        self._garp_task = None

    async def garp_done(self) -> None:
        """Wait for the repeated announcements (tests; a shutdown cancels them instead)."""
        if self._garp_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._garp_task


def _why(exc: Any) -> str:
    if isinstance(exc, NetlinkError):
        return f"netlink error {exc.code}: {exc.args[1] if len(exc.args) > 1 else exc}"
    return str(exc.strerror or exc) if isinstance(exc, OSError) else str(exc)
