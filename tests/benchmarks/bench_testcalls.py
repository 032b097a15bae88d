"""Test calls in the lab: detection of a trunk that rejects INVITEs, cost per call, MOS vs an offline reference.

``.venv/bin/python -m tests.benchmarks.bench_testcalls [--rounds N] [--calls 1,4,8]`` as root
(the namespace lab; run it under the integration lock). Prints:

1. **Detection**: ``trunk-a`` starts rejecting INVITEs with 503 while still
   answering OPTIONS. The time until the daemon shows it ``degraded: calls
   failing``, beside what Kamailio's dispatcher (the peer, same run, same
   trunk in its set 3 with OPTIONS keepalives every second) does meanwhile.
2. **Cost**: CPU seconds and RSS growth per concurrent test call (in this
   process, N calls of 3 s at once to the backup SBC, which echoes RTP).
3. **MOS check**: a call through 5% loss (nftables on the backup SBC's egress);
   loss, jitter and MOS from the call itself beside the same figures computed
   offline from the call's raw RTP trace by an independent straight-line
   implementation of RFC 3550 A.8 and the G.107 formulas.
4. **Cut -> first verified call** (``--parts verified --cuts N``): the primary is cut N
   times; each time, the seconds from the cut until the failover's verification call to
   each hotline was answered at the backup with audio (median, p95), beside the seconds
   until the routing state changed (what a read-back alone would report).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from monitoring.probes.testcall import ENDPOINT_DELAY_MS, CallSpec, TestCall
from provisioning.lab import Lab
from provisioning.lab import config as lab_config
from provisioning.lab import kamailio as lab_kamailio
from provisioning.lab import netns as labnet
from provisioning.lab.checks import dispatcher_flags, jsonrpc
from provisioning.lab.lab import MEDIA_PORT
from tests.conftest import free_port
from tests.integration.daemon_helpers import RunningDaemon, hotsite

TESTCALLS = """
[testcalls]
caller = "10086"
trunks = ["trunk-a"]
interval_s = {interval}
duration_s = 1
setup_timeout_s = 2
fall = 2
"""


def _addr(info: dict[str, Any], host: str) -> str:
    return str(next(h for h in info["hosts"] if h["name"] == host)["address"])


def _trunk_a_flags(info: dict[str, Any]) -> str:
    carrier = _addr(info, "carrier")
    flags = dispatcher_flags(jsonrpc(carrier, 5071, "/RPC", "dispatcher.list"))
    return flags.get(lab_kamailio.SET_TRUNKS, {}).get(f"sip:{_addr(info, 'trunk-a')}:5060", "?")


def _trunk_a_state(daemon: RunningDaemon) -> str:
    return str(next(t for t in daemon.status()["trunks"] if t["name"] == "trunk-a")["state"])


def detection(lab: Lab, info: dict[str, Any], rounds: int, interval: float) -> None:
    path = Path(info["workdir"]) / "hotsite.toml"
    path.write_text(
        lab_config.render(info, metrics_listen=f"127.0.0.1:{free_port()}")
        + TESTCALLS.format(interval=interval)
    )
    daemon = RunningDaemon(path, Path(info["workdir"]) / "bench-daemon.log")
    times: list[float] = []
    dispatcher_changes = 0
    try:
        daemon.wait_ready()
        for _ in range(rounds):
            _wait(lambda: _trunk_a_state(daemon) == "up", 90)
            lab.impair("trunk-a", reject_invites=503)
            cut = time.monotonic()
            seen = {_trunk_a_flags(info)}
            while _trunk_a_state(daemon) != "degraded":
                seen.add(_trunk_a_flags(info))
                if time.monotonic() - cut > 120:
                    raise SystemExit("not detected in 120 s")
                time.sleep(0.2)
            times.append(time.monotonic() - cut)
            seen.add(_trunk_a_flags(info))
            dispatcher_changes += len(seen - {"AP"})
            lab.heal("trunk-a")
    finally:
        daemon.stop()
    print(f"1. detection of a trunk rejecting INVITEs with 503 (test calls every {interval:g} s, fall 2)")
    print(
        f"   hotsite: degraded after median {statistics.median(times):.1f} s, max {max(times):.1f} s ({rounds} rounds)"
    )
    print(
        "   Kamailio dispatcher alone (same trunk, OPTIONS every 1 s): "
        + (
            "never marked it inactive"
            if not dispatcher_changes
            else f"{dispatcher_changes} non-AP flag(s) seen"
        )
    )
    print(
        f"   expected: between (fall - 1) x interval and fall x interval + one call, i.e. {interval:g}-{2 * interval + 3:g} s"
    )


VERIFY = """
[testcalls]
caller = "10086"
hotlines = ["vip", "cards"]
interval_s = 600
duration_s = 1
setup_timeout_s = 2
verify_timeout_s = 30
"""


def _verifications(daemon: RunningDaemon, after: int) -> list[dict[str, Any]]:
    proc = hotsite(
        "events", "--json", "--kind", "failover.verification", "--limit", "20", config=daemon.config
    )
    return [e for e in json.loads(proc.stdout or "[]") if e["id"] > after] if proc.returncode == 0 else []


def _newest_id(daemon: RunningDaemon) -> int:
    events = json.loads(hotsite("events", "--json", "--limit", "1", config=daemon.config).stdout or "[]")
    return int(events[0]["id"]) if events else 0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def cut_to_verified(lab: Lab, info: dict[str, Any], cuts: int) -> None:
    path = Path(info["workdir"]) / "hotsite.toml"
    text = lab_config.render(info, metrics_listen=f"127.0.0.1:{free_port()}")
    assert "max_auto_per_hour = 5" in text
    path.write_text(text.replace("max_auto_per_hour = 5", "max_auto_per_hour = 60") + VERIFY)
    daemon = RunningDaemon(path, Path(info["workdir"]) / "bench-verify.log")
    firsts: dict[str, list[float]] = {}
    routed: list[float] = []
    state = lambda: daemon.status()["failover"]["state"]  # noqa: E731
    try:
        daemon.wait_ready()
        for _ in range(cuts):
            _wait(
                lambda: (
                    state() == "primary_active"
                    and all(s["verdict"] == "up" for s in daemon.status()["sites"])
                ),
                120,
            )
            after = _newest_id(daemon)
            lab.impair("primary", cut=True)
            cut_wall, cut = time.time(), time.monotonic()
            _wait(lambda: state() == "backup_active", 60)
            routed.append(time.monotonic() - cut)
            _wait(lambda after=after: bool(_verifications(daemon, after)), 90)
            (verified,) = _verifications(daemon, after)
            for h in verified["data"]["hotlines"]:
                firsts.setdefault(h["number"], []).append(
                    h["answered_at_epoch"] - cut_wall if h["ok"] else float("inf")
                )
            lab.heal("primary")
            _wait(lambda: state() == "failback_pending", 120)
            back = _newest_id(daemon)
            _wait(lambda: hotsite("failback", "--yes", config=daemon.config).returncode == 0, 60)
            _wait(lambda back=back: bool(_verifications(daemon, back)), 90)
    finally:
        daemon.stop()
    print(f"4. cut of the primary -> first verified call at the backup ({cuts} cuts, calls of 1 s)")
    print(
        f"   routing state changed (read-back): median {statistics.median(routed):.2f} s, p95 {_pct(routed, 0.95):.2f} s"
    )
    for number, values in firsts.items():
        failed = sum(1 for v in values if v == float("inf"))
        good = [v for v in values if v != float("inf")]
        print(
            f"   {number} answered at the backup with audio: median {statistics.median(good):.2f} s,"
            f" p95 {_pct(good, 0.95):.2f} s, max {max(good):.2f} s; not verified: {failed} of {len(values)}"
        )


async def _calls(n: int, host: str) -> list[Any]:
    return await asyncio.gather(
        *(
            TestCall(CallSpec(f"b{i}", "95588", "10086", host, duration_s=3.0, setup_timeout_s=3)).run()
            for i in range(n)
        )
    )


async def _sampled(n: int, host: str, me: psutil.Process) -> tuple[list[Any], int]:
    """N calls at once, and the peak RSS sampled every 100 ms while they run."""
    task = asyncio.ensure_future(_calls(n, host))
    peak = me.memory_info().rss
    while not task.done():
        peak = max(peak, me.memory_info().rss)
        await asyncio.sleep(0.1)
    return await task, peak


def cost(info: dict[str, Any], sizes: list[int]) -> None:
    me = psutil.Process()
    backup = _addr(info, "backup")
    asyncio.run(_calls(1, backup))  # warm up: imports, first sockets
    print("2. cost per concurrent test call (3 s of media each, this process)")
    for n in sizes:
        rss0, cpu0 = me.memory_info().rss, sum(me.cpu_times()[:2])
        results, peak = asyncio.run(_sampled(n, backup, me))
        cpu = sum(me.cpu_times()[:2]) - cpu0
        ok = sum(r.ok for r in results)
        mos = min((r.mos for r in results if r.mos is not None), default=float("nan"))
        print(
            f"   {n:3d} at once: {ok}/{n} ok, CPU {cpu / n * 1000:6.1f} ms per call"
            f" ({cpu / n / 3 * 100:4.1f}% of a core while it runs), RSS +{(peak - rss0) / 1e6 / n:5.2f} MB per call,"
            f" lowest MOS {mos:.2f}"
        )


def offline(
    trace: list[tuple[int, int, int, float]], ssrc_of_first: bool = True
) -> tuple[float, float, float]:
    """(loss %, jitter ms, MOS) from a raw trace, straight from the RFC 3550 / G.107 text."""
    ssrc = trace[0][2]
    packets = [(s, ts, at) for s, ts, src, at in trace if src == ssrc]
    ext, last, cycles = [], None, 0
    for seq, _, _ in packets:
        if last is not None and seq < last and last - seq > 30000:
            cycles += 65536
        ext.append(cycles + seq)
        last = seq
    expected = max(ext) - min(ext) + 1
    loss = 100 * (expected - len(set(ext))) / expected
    jitter, prev = 0.0, None
    for _, ts, at in packets:
        transit = at * 8000 - ts
        if prev is not None:
            jitter += (abs(transit - prev) - jitter) / 16
        prev = transit
    ta = ENDPOINT_DELAY_MS  # the echo's RTT/2 is far below 100 ms here: Idd = 0 either way
    idd = (
        0.0
        if ta <= 100
        else 25
        * (
            (1 + math.log2(ta / 100) ** 6) ** (1 / 6)
            - 3 * (1 + (math.log2(ta / 100) / 3) ** 6) ** (1 / 6)
            + 2
        )
    )
    r = 93.2 - idd - 95 * loss / (loss + 25.1)
    mos = 1 + 0.035 * r + r * (r - 60) * (100 - r) * 7e-6
    return loss, jitter / 8, mos


def _ingress_loss(namespace: str, pct: float) -> None:
    """Drop ``pct``% of the RTP arriving at the host (input hook, port MEDIA_PORT).

    Not the lab's ``--loss``: that drops on output, where a dropped send fails
    with EPERM, and SIPp's RTP echo stops at its first failed send (seen: 4
    packets echoed, then silence). Dropped on input, the echo never sees them.
    """
    script = (
        f"add table inet {labnet.NFT_TABLE}\n"
        f"add chain inet {labnet.NFT_TABLE} in {{ type filter hook input priority 0; }}\n"
        f"add rule inet {labnet.NFT_TABLE} in udp dport {MEDIA_PORT} numgen random mod 1000 < {int(pct * 10)} drop\n"
    )
    subprocess.run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], input=script, text=True, check=True)


def mos_check(info: dict[str, Any]) -> None:
    _ingress_loss("hs-lab-backup", 5)
    try:
        call = TestCall(
            CallSpec("mos", "95588", "10086", _addr(info, "backup"), duration_s=10.0, setup_timeout_s=3)
        )
        call.trace = []
        result = asyncio.run(call.run())
    finally:
        labnet.nft_clear("hs-lab-backup")
    if not call.trace or result.loss_pct is None:
        raise SystemExit(f"no media to compare: {json.dumps(result.to_json())}")
    loss, jitter, mos = offline(call.trace)
    print(
        "3. MOS estimate beside an offline reference from the same RTP trace (5% loss on the way to the echo)"
    )
    print(
        f"   call:    {result.tx_packets} sent, {result.rx_packets} received, loss {result.loss_pct:.2f}%,"
        f" jitter {result.jitter_ms:.3f} ms, R {result.r_factor:.1f}, MOS {result.mos:.3f}"
    )
    print(
        f"   offline: loss {loss:.2f}%, jitter {jitter:.3f} ms, MOS {mos:.3f}   ({len(call.trace)} packets in the trace)"
    )


def _wait(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the lab")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval", type=float, default=8.0)
    parser.add_argument("--calls", default="1,4,8")
    parser.add_argument("--cuts", type=int, default=10)
    parser.add_argument(
        "--parts",
        default="cost,mos,detection,verified",
        help="which of cost, mos, detection, verified to run",
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    lab = Lab(Path(tempfile.mkdtemp(prefix="bench-testcalls-")))
    try:
        info = lab.up(mode="netns")
        print(json.dumps({"lab": info["mode"], "skipped": info["skipped"]}))
        if "cost" in parts:
            cost(info, [int(n) for n in args.calls.split(",")])
        if "mos" in parts:
            mos_check(info)
        if "detection" in parts:
            detection(lab, info, args.rounds, args.interval)
        if "verified" in parts:
            cut_to_verified(lab, info, args.cuts)
    finally:
        lab.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
