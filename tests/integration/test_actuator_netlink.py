"""The netlink actuator in two network namespaces of our own, joined by a veth pair.

Namespace "a" is the appliance's side (the service address comes and goes
there), namespace "b" a neighbour on the same segment that must learn the new
MAC from the gratuitous ARP (``arp_accept`` set, so it creates the entry) and
whose raw socket captures the frames. Names start with ``hs-act-`` and carry
our pid; both namespaces are deleted at the end, whatever happens.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pyroute2 import netns as pyroute2_netns

from failover.actuators.base import ActuatorError, StaleToken
from failover.actuators.netlink import ETH_P_ARP, NetlinkActuator
from failover.routing import Routing

IP = shutil.which("ip")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or IP is None, reason="needs root and iproute2 to make network namespaces"
)

SERVICE = "192.0.2.10/24"
FAILOVER = Routing("failover", "backup", 2, {"95588": 2}, frozenset({1}))
NORMAL = Routing("normal", "primary", 1, {"95588": 1}, active_sets=frozenset({1}))


@dataclass
class Segment:
    ns_a: str
    ns_b: str
    if_a: str
    if_b: str


def ip(*args: str) -> str:
    assert IP is not None
    return subprocess.run([IP, *args], check=True, capture_output=True, text=True, timeout=10).stdout


@pytest.fixture
def segment() -> Iterator[Segment]:
    tag = f"{os.getpid() % 100000}"
    seg = Segment(f"hs-act-{tag}-a", f"hs-act-{tag}-b", f"hsact{tag}a", f"hsact{tag}b")
    try:
        ip("netns", "add", seg.ns_a)
        ip("netns", "add", seg.ns_b)
        ip(
            "link",
            "add",
            seg.if_a,
            "netns",
            seg.ns_a,
            "type",
            "veth",
            "peer",
            "name",
            seg.if_b,
            "netns",
            seg.ns_b,
        )
        ip("-n", seg.ns_a, "link", "set", seg.if_a, "up")
        ip("-n", seg.ns_b, "link", "set", seg.if_b, "up")
        ip("-n", seg.ns_b, "addr", "add", "192.0.2.2/24", "dev", seg.if_b)
        subprocess.run(
            ["ip", "netns", "exec", seg.ns_b, "sysctl", "-qw", f"net.ipv4.conf.{seg.if_b}.arp_accept=1"],
            check=True,
            timeout=10,
        )
        yield seg
    finally:
        for ns in (seg.ns_a, seg.ns_b):
            subprocess.run([IP or "ip", "netns", "del", ns], capture_output=True, timeout=10)


def capture_garps(seg: Segment, seconds: float) -> list[tuple[str, str, str]]:
    """ARP frames seen in namespace b: (opcode, sender MAC, sender IP) for each announcement."""
    sock = pyroute2_netns.create_socket(seg.ns_b, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    sock.bind((seg.if_b, 0))
    sock.settimeout(0.1)
    seen = []
    deadline = time.monotonic() + seconds
    with sock:
        while time.monotonic() < deadline:
            try:
                frame = sock.recv(2048)
            except TimeoutError:
                continue
            op = struct.unpack("!H", frame[20:22])[0]
            sha, spa, tpa = frame[22:28], frame[28:32], frame[38:42]
            if spa == tpa:  # gratuitous: sender and target address are the same
                seen.append((str(op), sha.hex(":"), str(ipaddress.IPv4Address(spa))))
    return seen


def mac_of(ns: str, ifname: str) -> str:
    return ip("-n", ns, "-br", "link", "show", ifname).split()[2]


def test_address_follows_the_routing_and_the_neighbour_learns_it(segment: Segment) -> None:
    act = NetlinkActuator(
        SERVICE, segment.if_a, netns=segment.ns_a, serve_on="failover", garp_count=3, garp_interval_s=0.3
    )
    mac = mac_of(segment.ns_a, segment.if_a)

    async def go() -> list[tuple[str, str, str]]:
        assert await act.verify(NORMAL) == []
        assert "missing" in (await act.verify(FAILOVER))[0]
        capture = asyncio.create_task(asyncio.to_thread(capture_garps, segment, 1.2))
        await asyncio.sleep(0.2)  # the capture socket is open before the first announcement
        await act.apply(FAILOVER, 1)
        assert await act.verify(FAILOVER) == []
        assert "serves it elsewhere" in (await act.verify(NORMAL))[0]
        await act.apply(FAILOVER, 1)  # idempotent, and no second burst for the same routing
        seen = await capture
        assert act.garps_sent == 3
        return seen

    seen = asyncio.run(go())
    assert seen == [("1", mac, "192.0.2.10")] * 3
    assert "192.0.2.10/24" in ip("-n", segment.ns_a, "-br", "addr", "show", segment.if_a)
    neighbours = ip("-n", segment.ns_b, "neigh", "show", "192.0.2.10")
    assert mac in neighbours, neighbours

    async def back() -> None:
        await act.apply(NORMAL, 2)
        assert await act.verify(NORMAL) == []
        assert "missing" in (await act.verify(FAILOVER))[0]
        with pytest.raises(StaleToken):
            await act.apply(FAILOVER, 1)
        await act.close()

    asyncio.run(back())
    assert "192.0.2.10" not in ip("-n", segment.ns_a, "-br", "addr", "show", segment.if_a)


def test_hand_removed_address_is_drift_and_reapply_restores_and_announces(segment: Segment) -> None:
    act = NetlinkActuator(SERVICE, segment.if_a, netns=segment.ns_a, garp_count=1)

    async def go() -> None:
        await act.apply(FAILOVER, 5)
        ip("-n", segment.ns_a, "addr", "del", SERVICE, "dev", segment.if_a)
        assert "missing" in (await act.verify(FAILOVER))[0]
        await act.apply(FAILOVER, 5)
        assert await act.verify(FAILOVER) == []
        assert act.garps_sent == 2  # re-taken: announced again
        await act.close()

    asyncio.run(go())


def test_missing_interface_is_an_actuator_error(segment: Segment) -> None:
    act = NetlinkActuator(SERVICE, "nosuchif0", netns=segment.ns_a)

    async def go() -> None:
        with pytest.raises(ActuatorError, match="nosuchif0.*no such interface"):
            await act.apply(FAILOVER, 1)
        with pytest.raises(ActuatorError, match="no such interface"):
            await act.verify(FAILOVER)

    asyncio.run(go())


def test_routes_follow_the_address_and_hand_removal_is_drift(segment: Segment) -> None:
    routes = ["198.51.100.0/24 via 192.0.2.2", "203.0.113.0/25"]
    act = NetlinkActuator(SERVICE, segment.if_a, netns=segment.ns_a, garp_count=0, routes=routes)

    def table() -> str:
        return ip("-n", segment.ns_a, "route", "show")

    async def go() -> None:
        await act.apply(FAILOVER, 1)
        assert await act.verify(FAILOVER) == []
        assert f"198.51.100.0/24 via 192.0.2.2 dev {segment.if_a}" in table()
        assert f"203.0.113.0/25 dev {segment.if_a}" in table()
        # Someone deletes a route by hand: verify names it, a re-apply restores it.
        ip("-n", segment.ns_a, "route", "del", "198.51.100.0/24")
        assert await act.verify(FAILOVER) == [
            f"route 198.51.100.0/24 via 192.0.2.2 missing from {segment.if_a} (netns {segment.ns_a})"
            " (routing 'failover')"
        ]
        await act.apply(FAILOVER, 2)
        assert await act.verify(FAILOVER) == []
        await act.apply(NORMAL, 3)
        assert await act.verify(NORMAL) == []
        await act.close()

    asyncio.run(go())
    assert "198.51.100.0" not in table() and "203.0.113.0" not in table()
    assert "192.0.2.10" not in ip("-n", segment.ns_a, "-br", "addr", "show", segment.if_a)


def test_a_route_through_an_unreachable_gateway_fails_the_step_with_the_kernels_reason(
    segment: Segment,
) -> None:
    act = NetlinkActuator(
        SERVICE, segment.if_a, netns=segment.ns_a, garp_count=0, routes=["198.51.100.0/24 via 10.99.0.1"]
    )
    with pytest.raises(ActuatorError, match="netlink error"):
        asyncio.run(act.apply(FAILOVER, 1))
