"""RTT accuracy of the SIP OPTIONS probe against netem-injected delay (issue 3 target: p99 error < 2 ms).

``.venv/bin/python -m tests.benchmarks.bench_sip_rtt`` as root: makes its own network
namespace and veth pair, runs a stateless Kamailio inside, measures the probe's RTT
without delay (baseline) and with ``tc qdisc ... netem delay 20ms`` on our side's
egress, and prints the error against the injected delay at p50/p99. Everything it
made is removed in ``finally``.

Where the kernel has no ``sch_netem`` (``tc`` says "qdisc kind is unknown"), the
delay is injected by the responder instead: a second Kamailio in the namespace
holds each answer 20 ms (``usleep``, a nanosleep in its worker) before sending
it. The figure then also carries that sleep's overshoot (tens of microseconds),
so it is an upper bound on the probe's error; the output says which was used.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

from monitoring.probes.sip import SipOptionsProbe
from tests.benchmarks.kamailio import have_kamailio, responder

NETNS = "hsbench-rtt"
HOST_IF, PEER_IF = "hsbrtt0", "hsbrtt1"
HOST_IP, PEER_IP = "10.213.99.1", "10.213.99.2"
DELAY_MS = 20.0
SAMPLES = 400


def sh(*args: str, check: bool = True) -> None:
    subprocess.run(args, check=check, capture_output=True, timeout=15)


def setup() -> None:
    sh("ip", "netns", "add", NETNS)
    sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", PEER_IF)
    sh("ip", "link", "set", PEER_IF, "netns", NETNS)
    sh("ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_IF)
    sh("ip", "link", "set", HOST_IF, "up")
    sh("ip", "-n", NETNS, "addr", "add", f"{PEER_IP}/30", "dev", PEER_IF)
    sh("ip", "-n", NETNS, "link", "set", PEER_IF, "up")
    sh("ip", "-n", NETNS, "link", "set", "lo", "up")


def teardown() -> None:
    sh("ip", "link", "del", HOST_IF, check=False)
    sh("ip", "netns", "del", NETNS, check=False)


def netem_available() -> bool:
    result = subprocess.run(
        ["tc", "qdisc", "add", "dev", HOST_IF, "root", "netem", "delay", f"{DELAY_MS:g}ms"],
        capture_output=True, timeout=15,
    )  # fmt: skip
    return result.returncode == 0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def sample(probe: SipOptionsProbe, n: int, port: int = 5060) -> list[float]:
    rtts: list[float] = []
    while len(rtts) < n:
        result = await probe.probe("trunk:rtt", PEER_IP, port, timeout=0.5)
        if result.ok and result.rtt_s is not None:
            rtts.append(result.rtt_s * 1e3)
        await asyncio.sleep(0.01)
    return rtts


async def measure() -> None:
    probe = SipOptionsProbe()
    deadline = time.monotonic() + 10
    while not (await probe.probe("trunk:rtt", PEER_IP, 5060, timeout=0.5)).ok:
        if time.monotonic() > deadline:
            raise SystemExit("kamailio in the namespace did not answer")
        await asyncio.sleep(0.1)
    base = await sample(probe, SAMPLES)
    if netem_available():
        how = "tc netem delay on the veth"
        delayed = await sample(probe, SAMPLES)
    else:
        # No sch_netem here: the responder itself holds each answer DELAY_MS (Kamailio's
        # usleep, a nanosleep in its worker), on port 5064 of the same namespace.
        how = "NO sch_netem in this kernel: the responder holds each answer (Kamailio usleep)"
        delayed = await sample(probe, SAMPLES, 5064)
    await probe.close()
    print(f"{SAMPLES} probes each, veth pair into a namespace, Kamailio sl_send_reply; delay by {how}")
    print(f"   baseline RTT     p50 {pct(base, 0.5):7.3f} ms  p99 {pct(base, 0.99):7.3f} ms")
    print(f"   +{DELAY_MS:g} ms RTT     p50 {pct(delayed, 0.5):7.3f} ms  p99 {pct(delayed, 0.99):7.3f} ms")
    errors = [abs(rtt - DELAY_MS) for rtt in delayed]
    print(f"   |RTT - {DELAY_MS:g} ms|  p50 {pct(errors, 0.5):7.3f} ms  p99 {pct(errors, 0.99):7.3f} ms"
          "   (target: p99 < 2 ms; includes the path's own baseline RTT)")  # fmt: skip


def main() -> int:
    if os.geteuid() != 0:
        print("needs root (network namespaces and tc netem): nothing measured")
        return 1
    if not have_kamailio():
        print("kamailio not installed: nothing to measure")
        return 1
    teardown()  # leftovers of an interrupted run
    try:
        setup()
        with (
            responder([PEER_IP, "127.0.0.1"], children=1, netns=NETNS),
            responder([PEER_IP], port=5064, children=1, netns=NETNS, delay_us=int(DELAY_MS * 1000)),
        ):
            asyncio.run(measure())
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
