"""Benchmark: takeover by a standby appliance after the leader is SIGKILLed — full daemons, three sites.

Run as root: ``.venv/bin/python -m tests.benchmarks.bench_multisite_takeover [--trials 20] [--peer-trials 5]
[--raft-trials 5] [--flap-seconds 20 | --flap-60]``.

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
each takes about 40 s.

Two more figures (issue 21):

* **raft leader cut**: the site whose etcd member leads the raft group, and
  whose appliance holds the lease, is cut off the network; the time until a
  standby holds the lease (its own account), against the TTL and against
  TTL + etcd's election timeout. etcd extends every lease by the election
  timeout when a new raft leader takes over, so the expected bound is
  TTL + detection (1-2 election timeouts) + election timeout + retry.
* **flap**: a follower site's link is cut and healed every ``FLAP_HALF_S``
  seconds for ``--flap-seconds`` (``--flap-60``: a full minute); the seconds
  in which *no* appliance held the lease, from the appliances' logged role
  changes, with ``--pre-vote=true`` (as the etcd role provisions it) and
  ``false`` (etcd 3.4's default).

Prints figures; asserts nothing.
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
from tests.support.multisite import ELECTION_MS, SITES, Sites

BENCH_LOCK = Path("/tmp/hotsite-bench.lock")
FLAP_HALF_S = 3.0  # cut this long, then healed this long: longer than an election timeout  # one benchmark at a time: figures not distorted


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


def lead_from(sites: Sites, site: str) -> None:
    """Make ``site``'s appliance the leader: clean stops revoke the leases, it starts first."""
    for name in list(sites.daemons):
        sites.stop_appliance(name)
    sites.start_appliance(site)
    wait_for(
        lambda: coordination(sites, site).get("role") == "leader",
        timeout=60,
        what=f"{site} leads",
        on_fail=sites.logs,
        interval=0.2,
    )
    for other in SITES:
        if other != site:
            sites.start_appliance(other)
    wait_for(
        lambda: all(coordination(sites, s).get("role") == "follower" for s in SITES if s != site),
        timeout=60,
        what="the others follow",
        on_fail=sites.logs,
        interval=0.2,
    )


def raft_leader_cut(sites: Sites) -> float:
    """Cut the site that leads both raft and the lease; seconds until a standby holds the lease."""
    raft = wait_for(sites.raft_leader, timeout=30, what="a raft leader", on_fail=sites.logs, interval=0.5)
    if leader_of(sites, list(SITES)) != raft:
        lead_from(sites, raft)
    time.sleep(sites.ttl_s / 2)  # a random phase of the leader's renewals
    standbys = [s for s in SITES if s != raft]
    sites.cut(raft)
    cut = sites.cut_at[raft]
    new = wait_for(
        lambda: leader_of(sites, standbys),
        timeout=3 * sites.ttl_s + 30,
        what="takeover with the raft leader cut",
        on_fail=sites.logs,
        interval=0.1,
    )
    became = time.time() - coordination(sites, new)["since_s"] - cut
    sites.heal(raft)
    sites.cut_at.pop(raft)
    wait_for(
        lambda: coordination(sites, raft).get("role") == "follower",
        timeout=60,
        what="the healed site follows",
        on_fail=sites.logs,
        interval=0.2,
    )
    return became


def no_leader_seconds(sites: Sites, start: float, end: float) -> float:
    """Seconds of [start, end] in which no appliance held the lease (from their logged role changes)."""
    edges: list[tuple[float, float]] = []
    for changes in sites.role_timeline().values():
        role_at_start = "unknown"
        leading_since: float | None = None
        for at, role in changes:
            if at <= start:
                role_at_start = role
        if role_at_start == "leader":
            leading_since = start
        for at, role in changes:
            if not start < at < end:
                continue
            if role == "leader" and leading_since is None:
                leading_since = at
            elif role != "leader" and leading_since is not None:
                edges.append((leading_since, at))
                leading_since = None
        if leading_since is not None:
            edges.append((leading_since, end))
    covered, cursor = 0.0, start
    for begin, finish in sorted(edges):
        begin = max(begin, cursor)
        if finish > begin:
            covered += finish - begin
            cursor = finish
    return (end - start) - covered


def flap(pre_vote: bool, seconds: float) -> tuple[float, int]:
    """A fresh cluster; a follower site flaps for ``seconds``: (no-leader seconds, cuts)."""
    sites = Sites(ttl_s=10, retry_s=0.5, pre_vote=pre_vote)
    try:
        sites.up()
        for site in SITES:
            sites.start_appliance(site)
        leader = wait_for(
            lambda: leader_of(sites, list(SITES)),
            timeout=60,
            what="a leader",
            on_fail=sites.logs,
            interval=0.2,
        )
        raft = wait_for(sites.raft_leader, timeout=30, what="a raft leader", on_fail=sites.logs, interval=0.5)
        victim = next(s for s in SITES if s not in (leader, raft))
        time.sleep(2)
        start, cuts = time.time(), 0
        while time.time() - start < seconds:
            sites.cut(victim)
            cuts += 1
            time.sleep(FLAP_HALF_S)
            sites.heal(victim)
            sites.cut_at.pop(victim)
            time.sleep(FLAP_HALF_S)
        end = time.time()
        time.sleep(1)  # let the last role changes reach the logs
        return no_leader_seconds(sites, start, end), cuts
    finally:
        sites.down()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--peer-trials", type=int, default=5)
    ap.add_argument("--raft-trials", type=int, default=5)
    ap.add_argument("--flap-seconds", type=float, default=20.0)
    ap.add_argument("--flap-60", action="store_true", help="flap for a full minute (the issue's figure)")
    args = ap.parse_args(argv)
    flap_s = 60.0 if args.flap_60 else args.flap_seconds
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    table = []
    raft_cut: list[float] = []
    flaps: dict[bool, tuple[float, int]] = {}
    with BENCH_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if args.trials or args.peer_trials or args.raft_trials:
            sites = Sites(ttl_s=10, retry_s=0.5)
            try:
                sites.up()
                for site in SITES:
                    sites.start_appliance(site)
                for i in range(args.raft_trials):
                    raft_cut.append(raft_leader_cut(sites))
                    print(f"  raft leader cut trial {i + 1}: leader after {raft_cut[-1]:.2f} s", flush=True)
                for label, ttl, retry, trials in (
                    ("hotsite (ttl 10, retry 0.5)", 10, 0.5, args.trials),
                    ("patroni-like (ttl 30, loop_wait 10)", 30, 10.0, args.peer_trials),
                ):
                    if trials == 0:
                        continue
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
        if flap_s > 0:
            for pre_vote in (True, False):
                flaps[pre_vote] = flap(pre_vote, flap_s)
                print(
                    f"  flap {flap_s:g} s, pre-vote {pre_vote}: {flaps[pre_vote][0]:.1f} s without a leader",
                    flush=True,
                )
    print()
    if raft_cut:
        election = ELECTION_MS / 1000
        print(
            f"| raft leader's site cut (ttl 10 s, election timeout {election:g} s) | trials | median | max | TTL | TTL + election |"
        )
        print("|---|---|---|---|---|---|")
        print(
            f"| leader after the cut (its role's since) | {len(raft_cut)} | {statistics.median(raft_cut):.2f} s"
            f" | {max(raft_cut):.2f} s | 10 s | {10 + election:g} s |"
        )
        print()
    for pre_vote, (lost, cuts) in flaps.items():
        print(
            f"flap of a follower site, {flap_s:g} s ({cuts} cuts of {FLAP_HALF_S:g} s), pre-vote {pre_vote}:"
            f" {lost:.1f} s without a leader ({60 * lost / flap_s:.1f} s per minute)"
        )
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
