"""How long the actuators take to move routing, against the real things.

Run as root (the netlink part needs namespaces): ``.venv/bin/python -m tests.benchmarks.bench_actuators``.
Prints figures; asserts nothing.

* Kamailio: apply of a failover routing (primary fenced, every hotline moved,
  list file written and fsynced) and of the failback, alternating, 20 trials
  each, for 5 and 200 hotlines, over HTTP and over the unix datagram socket;
  and verify. Issue 4's target for "every hotline routed by plan with the
  primary fenced" is median <= 1.0 s, p95 <= 1.5 s for the whole runbook:
  this is the Kamailio step's share of it.
* Netlink: apply that takes a service address and sends the first
  gratuitous ARP, in two namespaces of our own (hs-act-bench-*), printed beside
  keepalived 2.2.7's 3.07 s to move an address with default VRRP timers
  (REFERENCE.md, measured earlier on this machine, not in this run; keepalived's
  figure includes failure detection, ours is the actuation alone).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from appliance.kamailio import KamailioRpc
from failover.actuators.kamailio import KamailioActuator
from failover.actuators.netlink import NetlinkActuator
from failover.routing import Routing
from tests.integration.test_actuator_kamailio import World

TRIALS = 20


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p * (len(ordered) - 1))))]


def line(label: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"  {label:<44} median {statistics.median(ms):7.1f} ms   p95 {pct(ms, 0.95):7.1f} ms   max {max(ms):7.1f} ms"


def routings(hotlines: int) -> tuple[Routing, Routing]:
    numbers = [str(95000 + i) for i in range(hotlines)]
    failover = Routing("failover", "backup", 2, dict.fromkeys(numbers, 2), frozenset({1}))
    normal = Routing("normal", "primary", 1, dict.fromkeys(numbers, 1), active_sets=frozenset({1}))
    return failover, normal


async def bench_kamailio(world: World) -> None:
    print("Kamailio actuator (Kamailio 5.6, lab config, loopback):")
    for over in ("http", "socket"):
        for hotlines in (5, 200):
            rpc = (
                KamailioRpc(world.rpc_url, timeout_s=2)
                if over == "http"
                else KamailioRpc(socket_path=world.rpc_socket, timeout_s=2)
            )
            act = KamailioActuator(rpc, dispatcher_list=world.dispatcher_list, owns_rpc=True, timeout_s=10)
            failover, normal = routings(hotlines)
            token = await act.highest_token()
            fo: list[float] = []
            fb: list[float] = []
            ver: list[float] = []
            for _ in range(TRIALS):
                for routing, sink in ((failover, fo), (normal, fb)):
                    token += 1
                    started = time.perf_counter()
                    await act.apply(routing, token)
                    sink.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    assert await act.verify(routing) == []
                    ver.append(time.perf_counter() - started)
            print(line(f"{over}, {hotlines} hotlines: apply failover", fo))
            print(line(f"{over}, {hotlines} hotlines: apply failback", fb))
            print(line(f"{over}, {hotlines} hotlines: verify", ver))
            await act.close()


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


async def bench_netlink() -> None:
    a, b = "hs-act-bench-a", "hs-act-bench-b"
    try:
        ip("netns", "add", a)
        ip("netns", "add", b)
        ip(
            "link",
            "add",
            "hsactbencha",
            "netns",
            a,
            "type",
            "veth",
            "peer",
            "name",
            "hsactbenchb",
            "netns",
            b,
        )
        ip("-n", a, "link", "set", "hsactbencha", "up")
        ip("-n", b, "link", "set", "hsactbenchb", "up")
        act = NetlinkActuator("192.0.2.10/24", "hsactbencha", netns=a, garp_count=1)
        failover = Routing("failover", "backup", 2, {}, frozenset({1}))
        normal = Routing("normal", "primary", 1, {})
        take, release = [], []
        for token in range(1, TRIALS + 1):
            started = time.perf_counter()
            await act.apply(failover, 2 * token)
            take.append(time.perf_counter() - started)
            started = time.perf_counter()
            await act.apply(normal, 2 * token + 1)
            release.append(time.perf_counter() - started)
        print("Netlink actuator (veth pair in two namespaces):")
        print(line("take address + first gratuitous ARP", take))
        print(line("release address", release))
        print("  keepalived 2.2.7, default VRRP timers (REFERENCE.md)   3070 ms  (detection + takeover)")
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="hs-act-bench-", dir="/tmp"))
    world = World(workdir)
    try:
        asyncio.run(bench_kamailio(world))
    finally:
        world.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if os.geteuid() == 0 and shutil.which("ip"):
        asyncio.run(bench_netlink())
    else:
        print("Netlink actuator: skipped (needs root and iproute2)")


if __name__ == "__main__":
    main()
