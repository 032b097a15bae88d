"""A stalled leader's in-flight write, resumed after a takeover, is refused by the world.

Three sites in network namespaces, a real 3-member etcd cluster and a full
``hotsite run`` per site (``tests/support/multisite.py``), driving the
reference hook (``tests/support/routing_world.py``), made slow: an apply
commits one second after it starts, as a slow carrier API would.

Each run: the leader is told to move routing; while its hook is in flight,
the leader *and* the hook are paused together (SIGSTOP, as a VM or GC stall
would pause them). A standby takes the lease, fences the world with its
token and re-reads the routing. Then both resume (the hook first, so the
late write reaches the world before the old daemon's own timer could kill
it): the world must refuse the late write, and the new leader must never go
to ``held`` (it read a consistent world, not a half-written one).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.daemon_helpers import hotsite, wait_for
from tests.support.multisite import SITES, Sites

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(
        not (shutil.which("etcd") and shutil.which("sipp")), reason="needs etcd-server and sip-tester"
    ),
]

TTL_S = 3
RUNS = int(os.environ.get("HOTSITE_STALL_RUNS", "10"))
HOOK_SECONDS = 1.0


@pytest.fixture(scope="module")
def sites() -> Iterator[Sites]:
    world = Sites(ttl_s=TTL_S)
    try:
        world.up()
        for site in SITES:
            world.start_appliance(site)
        yield world
    finally:
        world.down()


def status(sites: Sites, site: str) -> dict[str, Any]:
    """The appliance's status, or {} while it does not answer (a loaded machine: asked again)."""
    try:
        return sites.status(site) or {}
    except subprocess.TimeoutExpired:
        return {}


def leader_of(sites: Sites, among: list[str]) -> str | None:
    return next((s for s in among if status(sites, s).get("coordination", {}).get("role") == "leader"), None)


def went_held(sites: Sites, site: str, since: float) -> list[dict[str, Any]]:
    proc = hotsite(
        "events", "--kind", "failover.decision", "--json", "--limit", "50", config=sites.configs[site]
    )
    assert proc.returncode == 0, proc.stderr
    # `--json` prints times as RFC 3339 text (what scripts and jq expect), not epoch floats.
    return [
        e
        for e in json.loads(proc.stdout)
        if datetime.datetime.fromisoformat(e["at"]).timestamp() >= since and e["subject"] == "held"
    ]


def settled_leader(sites: Sites) -> str:
    """A leader that has fenced and re-read the world, with the others following."""

    def ready() -> str | None:
        views = {s: status(sites, s) for s in SITES}
        roles = {s: v.get("coordination", {}).get("role") for s, v in views.items()}
        leaders = [s for s, r in roles.items() if r == "leader"]
        if len(leaders) != 1 or list(roles.values()).count("follower") != len(SITES) - 1:
            return None
        lead = views[leaders[0]]
        if not lead["coordination"].get("observed_routing"):
            return None
        if lead.get("failover", {}).get("state") in ("failing_over", "failing_back"):
            return None
        return leaders[0]

    found: str = wait_for(ready, timeout=60, what="one settled leader", on_fail=sites.logs, interval=0.2)
    return found


def one_stall(sites: Sites, run: int) -> dict[str, Any]:
    leader = settled_leader(sites)
    started = time.time()
    before = sites.world()
    assert before is not None
    command = "failover" if before["routing"]["name"] == "normal" else "failback"
    inflight = sites.dir / "world.json.inflight"
    slow = sites.dir / "world.json.slow"
    slow.write_text(str(HOOK_SECONDS))
    asked = hotsite(command, "--force", "--yes", "--json", config=sites.configs[leader], timeout=60)
    assert asked.returncode == 0, asked.stdout + asked.stderr
    hook = wait_for(
        lambda: inflight.exists() and inflight.read_text() and json.loads(inflight.read_text()),
        timeout=10,
        what="the leader's hook in flight",
        on_fail=sites.logs,
        interval=0.01,
    )
    daemon = sites.daemons[leader]
    os.killpg(daemon.pid, signal.SIGSTOP)
    os.kill(hook["pid"], signal.SIGSTOP)
    slow.unlink()
    try:
        standbys = [s for s in SITES if s != leader]
        new = wait_for(
            lambda: next(
                (
                    s
                    for s in standbys
                    if (c := status(sites, s).get("coordination", {})).get("role") == "leader"
                    and c.get("observed_routing")
                ),
                None,
            ),
            timeout=TTL_S + 20,
            what="a standby takes over and re-reads the routing",
            on_fail=sites.logs,
            interval=0.1,
        )
    finally:
        os.kill(hook["pid"], signal.SIGCONT)  # the late write goes first ...
        late = wait_for(
            lambda: next(
                (
                    e
                    for e in sites.world_log()
                    if e["by"] == leader and e["token"] == hook["token"] and e["action"] == "apply"
                ),
                None,
            ),
            timeout=15,
            what="the paused hook's late write reaches the world",
            on_fail=sites.logs,
            interval=0.02,
        )
        os.killpg(daemon.pid, signal.SIGCONT)  # ... then the daemon that started it
    new_view = status(sites, new)
    time.sleep(1.0)  # let both resumed daemons run a few cycles
    after = sites.world()
    assert after is not None
    return {
        "run": run,
        "old": leader,
        "old_token": hook["token"],
        "new": new,
        "new_token": new_view.get("coordination", {}).get("token"),
        "late_verdict": late["verdict"],
        "observed": new_view.get("coordination", {}).get("observed_routing"),
        "held": went_held(sites, new, started),
        "world_before": before["routing"]["name"],
        "world_after": after["routing"]["name"],
        "world_token": after["token"],
    }


def test_a_stalled_leaders_in_flight_write_is_refused_after_a_takeover(sites: Sites) -> None:
    results = []
    for run in range(1, RUNS + 1):
        result = one_stall(sites, run)
        print(json.dumps(result), flush=True)
        results.append(result)
        assert result["late_verdict"] == "refused", (result, sites.logs())
        assert not result["held"], (result, sites.logs())
        # The new leader read the world as it was before the stalled write, and it stays so.
        assert result["observed"] == result["world_before"] == result["world_after"], result
        assert result["world_token"] >= result["new_token"] > result["old_token"], result
    accepted = [r for r in results if r["late_verdict"] != "refused"]
    assert not accepted
