"""Benchmark: takeover by a standby appliance after the leader is SIGKILLed — full daemons, three sites.

Run as root: ``.venv/bin/python -m tests.benchmarks.bench_multisite_takeover [--trials 20] [--peer-trials 5]``.

The three-site world of ``tests/support/multisite.py`` (a namespace per site with
an etcd member, an SBC, a health endpoint and a ``hotsite run`` daemon). Each
trial SIGKILLs whichever appliance leads, and measures, on the new leader's own
account (its role's ``since``), the time from the kill to:

* **leader**: a standby holds the lease;
* **re-read**: it has read the real routing back (it may act from then on;
  the time of its ``coordination.takeover`` audit record).

The killed appliance is then restarted and must come back as a follower.
hotsite's defaults (ttl 10 s, retry 0.5 s; target: under TTL + 1 s) run
first, then the same with Patroni-like defaults (ttl 30 s, loop_wait 10 s:
a standby retries every 10 s) as the peer figure, with fewer trials because
each takes about 40 s. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tests.integration.daemon_helpers import hotsite, wait_for
from tests.support.multisite import SITES, Sites

BENCH_LOCK = Path("/tmp/hotsite-bench.lock")  # one benchmark at a time: figures not distorted


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def coordination(sites: Sites, site: str) -> dict[str, Any]:
    status = sites.status(site)
    return (status or {}).get("coordination") or {}


def leader_of(sites: Sites, among: list[str]) -> str | None:
    return next((s for s in among if coordination(sites, s).get("role") == "leader"), None)


def takeover_event(sites: Sites, site: str, *, after: float) -> dict[str, Any] | None:
    """The new leader's audit record of re-reading the real routing (its own timestamp)."""
    proc = hotsite(
        "events", "--kind", "coordination.takeover", "--json", "--limit", "5", config=sites.configs[site]
    )
    if proc.returncode != 0:
        return None
    return next((e for e in json.loads(proc.stdout) if e["at_epoch"] > after), None)


def trial(sites: Sites) -> tuple[float, float]:
    ttl = sites.ttl_s
    leader = wait_for(
        lambda: leader_of(sites, list(SITES)),
        timeout=3 * ttl + 30,
        what="a leader",
        on_fail=sites.logs,
        interval=0.1,
    )
    # Wait until the others are followers and the leader has settled (a random phase of its renewal).
    wait_for(
        lambda: all(coordination(sites, s).get("role") == "follower" for s in SITES if s != leader),
        timeout=3 * ttl + 30,
        what="standbys",
        on_fail=sites.logs,
        interval=0.1,
    )
    standbys = [s for s in SITES if s != leader]
    sites.kill_appliance(leader)
    killed = time.time()
    new = wait_for(
        lambda: leader_of(sites, standbys),
        timeout=3 * ttl + 30,
        what="takeover",
        on_fail=sites.logs,
        interval=0.1,
    )
    role = coordination(sites, new)
    became = time.time() - role["since_s"] - killed
    event = wait_for(
        lambda: takeover_event(sites, new, after=killed),
        timeout=30,
        what="re-read",
        on_fail=sites.logs,
        interval=0.1,
    )
    reread = event["at_epoch"] - killed
    sites.start_appliance(leader)
    wait_for(
        lambda: coordination(sites, leader).get("role") == "follower",
        timeout=60,
        what="restarted follows",
        on_fail=sites.logs,
        interval=0.1,
    )
    return became, reread


def run(sites: Sites, trials: int, label: str) -> list[tuple[float, float]]:
    results = []
    for i in range(trials):
        became, reread = trial(sites)
        results.append((became, reread))
        print(
            f"  {label} trial {i + 1}: leader after {became:.2f} s, routing re-read by {reread:.2f} s",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--peer-trials", type=int, default=5)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    table = []
    with BENCH_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sites = Sites(ttl_s=10, retry_s=0.5)
        try:
            sites.up()
            for site in SITES:
                sites.start_appliance(site)
            for label, ttl, retry, trials in (
                ("hotsite (ttl 10, retry 0.5)", 10, 0.5, args.trials),
                ("patroni-like (ttl 30, loop_wait 10)", 30, 10.0, args.peer_trials),
            ):
                if ttl != sites.ttl_s:
                    sites.reconfigure(ttl_s=ttl, retry_s=retry)
                    for site in SITES:
                        sites.stop_appliance(site)
                    for site in SITES:
                        sites.start_appliance(site)
                results = run(sites, trials, label)
                table.append((label, ttl, results))
        finally:
            sites.down()
    print()
    print(
        "| profile | trials | leader after kill (its role's since, ±0.1 s): median | p95 | max | target (TTL + 1 s) | routing re-read (audit time): median |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, ttl, results in table:
        if not results:
            continue
        became = [b for b, _ in results]
        reread = [r for _, r in results]
        print(
            f"| {label} | {len(results)} | {statistics.median(became):.2f} s | {pct(became, 0.95):.2f} s"
            f" | {max(became):.2f} s | {ttl + 1} s | {statistics.median(reread):.2f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
