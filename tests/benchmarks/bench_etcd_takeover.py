"""Benchmark: standby takeover after the active appliance is SIGKILLed, and lease round trips.

Run: ``.venv/bin/python -m tests.benchmarks.bench_etcd_takeover`` (needs ``etcd`` from
``etcd-server``; starts its own three-member cluster on 127.0.0.1; ~1 minute).

One child process holds the leader lease of 2 x 20 routing domains (each
started at a random phase of its renewal cycle), then is SIGKILLed; standbys
in this process measure when each domain has a new leader. Twenty trials run
side by side with hotsite's defaults (ttl 10 s, standby retry 0.5 s) and with
Patroni-like defaults (ttl 30 s, loop_wait 10 s: renew and retry every 10 s)
as the peer figure. Then the round trip of a keep-alive and of the
compare-create transaction, sequentially.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import time

from failover.etcd import EtcdLease, Gateway
from tests.integration.test_etcd_cluster import EtcdCluster

TRIALS = 20
PROFILES = {"hotsite (ttl 10, retry 0.5)": (10, 0.5), "patroni-like (ttl 30, loop_wait 10)": (30, 10.0)}

CHILD = r"""
import asyncio, random, sys
from failover.etcd import EtcdLease, Gateway
endpoints = sys.argv[1].split(",")
specs = [s.split(":") for s in sys.argv[2:]]  # domain:ttl:retry
async def hold(domain, ttl, retry):
    await asyncio.sleep(random.uniform(0, ttl / 3))  # a random phase of the renewal cycle
    lease = EtcdLease(Gateway(endpoints, timeout_s=1.0), domain=domain, appliance="active", ttl_s=ttl, retry_s=retry)
    while True:
        await lease.cycle()
        if lease.may_act():
            print("leader", domain, flush=True)
        await asyncio.sleep(ttl / 3 if lease.state.role == "leader" else retry)
async def main():
    await asyncio.gather(*(hold(d, int(t), float(r)) for d, t, r in specs))
asyncio.run(main())
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def takeover(cluster: EtcdCluster) -> dict[str, list[float]]:
    specs = [
        (f"{name[:7]}-{i}", ttl, retry) for name, (ttl, retry) in PROFILES.items() for i in range(TRIALS)
    ]
    profile_of = {f"{name[:7]}-{i}": name for name in PROFILES for i in range(TRIALS)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, ",".join(cluster.endpoints)] + [f"{d}:{t}:{r}" for d, t, r in specs],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert child.stdout is not None
    leading: set[str] = set()
    while len(leading) < len(specs):
        line = await asyncio.to_thread(child.stdout.readline)
        if not line:
            raise RuntimeError("the active appliance died")
        leading.add(line.split()[1])
    standbys = [
        EtcdLease(
            Gateway(cluster.endpoints, timeout_s=1.0), domain=d, appliance="standby", ttl_s=t, retry_s=r
        )
        for d, t, r in specs
    ]

    async def loop(lease: EtcdLease) -> None:
        await asyncio.sleep(random.uniform(0, lease.retry_s))
        while True:
            await lease.cycle()
            await asyncio.sleep(lease.ttl_s / 3 if lease.state.role == "leader" else lease.retry_s)

    tasks = [asyncio.create_task(loop(s)) for s in standbys]
    await asyncio.sleep(max(ttl for _d, ttl, _r in specs) / 3 + 1)  # every standby has seen the leader
    assert not any(s.may_act() for s in standbys)
    child.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    child.wait()
    took: dict[str, float] = {}
    while len(took) < len(standbys) and time.monotonic() - killed < 60:
        for s in standbys:
            if s.may_act() and s.state.domain not in took:
                took[s.state.domain] = time.monotonic() - killed
        await asyncio.sleep(0.01)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for s in standbys:
        await s.gateway.close()
    results: dict[str, list[float]] = {name: [] for name in PROFILES}
    for domain, seconds in took.items():
        results[profile_of[domain]].append(seconds)
    return results


async def round_trips(cluster: EtcdCluster, n: int = 200) -> dict[str, list[float]]:
    gateway = Gateway(cluster.endpoints, timeout_s=1.0)
    lease_id, _ttl = await gateway.grant(10)
    found: dict[str, list[float]] = {"keepalive": [], "compare-create (txn)": [], "grant": []}
    for i in range(n):
        t0 = time.perf_counter()
        await gateway.keepalive(lease_id)
        t1 = time.perf_counter()
        await gateway.create_if_absent(f"/hotsite/bench-rtt/{i % 5}", "x", lease_id)
        t2 = time.perf_counter()
        found["keepalive"].append(t1 - t0)
        found["compare-create (txn)"].append(t2 - t1)
    for _ in range(20):
        t0 = time.perf_counter()
        await gateway.grant(10)
        found["grant"].append(time.perf_counter() - t0)
    await gateway.close()
    return found


def main() -> None:
    cluster = EtcdCluster(3)
    try:
        cluster.start()
        results = asyncio.run(takeover(cluster))
        print(f"\nTakeover after SIGKILL of the active appliance, {TRIALS} trials each (seconds):")
        print(f"{'profile':40} {'n':>3} {'min':>6} {'median':>7} {'p95':>6} {'max':>6}  target")
        for name, (ttl, retry) in PROFILES.items():
            v = results[name]
            if not v:
                print(f"{name:40}   0  (no takeover within 60 s)")
                continue
            target = (
                f"< ttl + 1 = {ttl + 1}"
                if name.startswith("hotsite")
                else f"<= ttl + loop_wait = {ttl + retry:g}"
            )
            print(
                f"{name:40} {len(v):>3} {min(v):>6.2f} {statistics.median(v):>7.2f} {pct(v, 0.95):>6.2f}"
                f" {max(v):>6.2f}  {target}"
            )
        rtt = asyncio.run(round_trips(cluster))
        print("\nLease round trips through the v3 JSON gateway, 3-member cluster on loopback (ms):")
        for name, v in rtt.items():
            ms = [x * 1000 for x in v]
            print(
                f"{name:24} n={len(ms):>3} p50={statistics.median(ms):6.2f} p95={pct(ms, 0.95):6.2f} max={max(ms):6.2f}"
            )
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
