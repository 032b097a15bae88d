"""Three sites, three appliances, one etcd cluster spread over them: real daemons, real partitions.

Each site is a network namespace with an etcd member, its SBC (SIPp), its
health endpoint and a ``hotsite run`` daemon (``tests/support/multisite.py``).
They drive one shared routing world through the hook actuator, which keeps
the newest fencing token it obeyed and logs every request.

* The primary's appliance holds the lease; the primary site is cut off the
  network (etcd member, appliance, SBC, all at once): the leader is now in a
  minority partition. It must stop acting, a surviving appliance must take
  the lease and, with the other survivor's view agreeing the primary is
  down, fail over with the hotlines spread over east and west by plan.
* West then reports it cannot serve (grey failure): its hotlines are
  re-planned onto east and the IVR, with a new token.
* The primary comes back: its appliance stays passive.
* The leader is killed with SIGKILL: the standby takes over within the TTL
  plus a cycle, re-reads the real routing and keeps it; the killed one,
  restarted, follows and never acts.
* An HA pair at the east site (two appliances on machines of their own):
  the active one's network is cut; it stops, a standby takes over, and the
  returning one follows.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.daemon_helpers import wait_for
from tests.support.multisite import Sites

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(
        not (shutil.which("etcd") and shutil.which("sipp")), reason="needs etcd-server and sip-tester"
    ),
]

TTL_S = 3  # short for the test, but not so short that a loaded 2-core machine drops leases


@pytest.fixture(scope="module")
def sites() -> Iterator[Sites]:
    world = Sites(ttl_s=TTL_S)
    try:
        world.up()
        yield world
    finally:
        world.down()


def coordination(sites: Sites, site: str) -> dict[str, Any]:
    status = sites.status(site)
    return status.get("coordination", {}) if status else {}


def failover(sites: Sites, site: str) -> dict[str, Any]:
    status = sites.status(site)
    return status.get("failover", {}) if status else {}


def applied(sites: Sites) -> list[dict[str, Any]]:
    return [e for e in sites.world_log() if e["verdict"] == "applied"]


def test_three_sites_fail_over_by_plan_and_fence_a_partitioned_leader(sites: Sites) -> None:
    # The primary's appliance first, so that it is the leader when its site is cut.
    sites.start_appliance("primary")
    wait_for(
        lambda: coordination(sites, "primary").get("role") == "leader",
        timeout=20,
        what="primary's appliance leads",
        on_fail=lambda: sites.logs(),
        interval=0.1,
    )
    for site in ("east", "west"):
        sites.start_appliance(site)
    wait_for(
        lambda: all(coordination(sites, s).get("role") == "follower" for s in ("east", "west")),
        timeout=20,
        what="east and west follow",
        on_fail=sites.logs,
        interval=0.1,
    )
    # The leader read the real routing (normal) on taking the lease, and everyone sees everyone.
    wait_for(
        lambda: coordination(sites, "primary").get("observed_routing") == "normal",
        timeout=15,
        what="the leader observed normal routing",
        on_fail=sites.logs,
        interval=0.1,
    )
    wait_for(
        lambda: all(
            len([p for p in coordination(sites, s).get("peers") or [] if p["fresh"]]) == 3
            for s in sites.configs
        ),
        timeout=15,
        what="every appliance sees three fresh views",
        on_fail=sites.logs,
        interval=0.1,
    )
    old_token = sites.world()["token"]  # type: ignore[index]

    sites.cut("primary")
    cut = sites.cut_at["primary"]
    # The isolated leader loses its lease view and stops: it says so in its status.
    old = wait_for(
        lambda: (c := coordination(sites, "primary")).get("role") == "unknown" and c,
        timeout=TTL_S + 3,
        what="the partitioned leader demotes itself",
        on_fail=sites.logs,
        interval=0.1,
    )
    demoted_at = time.time() - old["since_s"]  # by its own account
    # A survivor takes the lease and fails over by plan.
    world = wait_for(
        lambda: (w := sites.world()) and w["routing"]["name"] == "failover" and w,
        timeout=TTL_S + 15,
        what="failover applied by a surviving appliance",
        on_fail=sites.logs,
        interval=0.1,
    )
    assert world["by"] in ("east", "west") and world["token"] > old_token
    assert world["routing"]["hotlines"] == {"95588": 2, "95566": 3, "95577": 2}  # vip, loans east; cards west
    assert world["routing"]["fenced_uris"] == ["sip:10.78.0.10:5060"]
    leader = world["by"]
    decision = failover(sites, leader)["last_decision"]
    assert "failover completed" in decision, decision
    # Fencing: nothing the cut appliance did reached the world after the cut; the new
    # leader's first action came after the old one had stopped.
    log = applied(sites)
    assert not [e for e in log if e["by"] == "primary" and e["at"] > cut], log
    first_new = min(e["at"] for e in log if e["by"] == leader)
    assert cut < demoted_at < first_new, (cut, demoted_at, first_new)  # never two leaders at once
    assert demoted_at - cut <= TTL_S + 1
    tokens = [e["token"] for e in log]
    assert tokens == sorted(tokens), log
    assert not [e for e in sites.world_log() if e["verdict"] == "refused"], "a stale token reached the world"

    # West says it cannot serve: its hotlines are planned around it, with a newer token.
    sites.degrade("west")
    world = wait_for(
        lambda: (w := sites.world()) and w["routing"]["name"] == "failover-without:west" and w,
        timeout=15,
        what="re-plan without west",
        on_fail=sites.logs,
        interval=0.1,
    )
    assert world["routing"]["hotlines"] == {"95588": 2, "95566": 9, "95577": 2}  # cards to the IVR
    assert world["routing"]["fenced_uris"] == ["sip:10.78.0.10:5060", "sip:10.78.0.30:5060"]
    assert world["token"] >= max(e["token"] for e in log)

    # The primary comes back: its appliance follows, never acts with its old token.
    sites.heal("primary")
    wait_for(
        lambda: coordination(sites, "primary").get("role") == "follower",
        timeout=15,
        what="the returning appliance stays passive",
        on_fail=sites.logs,
        interval=0.1,
    )
    time.sleep(2)
    assert not [e for e in applied(sites) if e["by"] == "primary" and e["at"] > cut]
    assert sites.world()["routing"]["name"] == "failover-without:west"  # type: ignore[index]


def test_the_standby_takes_over_a_killed_leader_and_keeps_the_real_routing(sites: Sites) -> None:
    before = sites.world()
    assert before is not None
    leader = wait_for(
        lambda: next((s for s in sites.configs if coordination(sites, s).get("role") == "leader"), None),
        timeout=10,
        what="a leader after the primary's return",
        on_fail=sites.logs,
        interval=0.1,
    )
    standbys = [s for s in sites.configs if s != leader]
    sites.kill_appliance(leader)
    killed = time.time()
    # Any standby may win the lease (the primary's appliance, back now, is one of them).
    new = wait_for(
        lambda: next((s for s in standbys if coordination(sites, s).get("role") == "leader"), None),
        timeout=TTL_S + 5,
        what="a standby takes the lease",
        on_fail=sites.logs,
        interval=0.1,
    )
    # When it became leader, by its own account (polling three daemons' CLI is slower than that).
    role = coordination(sites, new)
    took_over = time.time() - role["since_s"] - killed
    assert took_over <= TTL_S + 1.5, (took_over, role)
    # It re-read the real routing before acting and follows it: no move back, no re-apply needed.
    view = wait_for(
        lambda: (c := coordination(sites, new)).get("observed_routing") and c,
        timeout=10,
        what="takeover re-read",
        on_fail=sites.logs,
        interval=0.1,
    )
    assert view["observed_routing"] == before["routing"]["name"]
    state = failover(sites, new)
    assert state["routing"] == "failover" and state["lost_sites"] == ["west"], state
    time.sleep(1.5)
    assert sites.world()["routing"] == before["routing"]  # type: ignore[index]
    # The killed appliance restarts (as after a power loss): passive before anything else.
    sites.start_appliance(leader)
    wait_for(
        lambda: coordination(sites, leader).get("role") == "follower",
        timeout=20,
        what="the restarted appliance follows",
        on_fail=sites.logs,
        interval=0.1,
    )
    time.sleep(1.5)
    assert not [e for e in applied(sites) if e["by"] == leader and e["at"] > killed]
    assert coordination(sites, new).get("role") == "leader"


def test_an_ha_pair_at_a_backup_site_hands_over_when_the_active_ones_network_is_cut(sites: Sites) -> None:
    """Two appliances at east on machines of their own; the active one's link is cut."""
    sites.add_pair_member("east-b", "east", "10.78.0.21")
    others = list(sites.daemons)
    for name in others:  # clean stops revoke their leases: east-b, started alone, takes the lease
        sites.stop_appliance(name)
    sites.start_appliance("east-b")
    wait_for(
        lambda: coordination(sites, "east-b").get("role") == "leader",
        timeout=20,
        what="east-b leads",
        on_fail=sites.logs,
        interval=0.1,
    )
    for name in others:
        sites.start_appliance(name)
    wait_for(
        lambda: all(coordination(sites, s).get("role") == "follower" for s in others),
        timeout=20,
        what="the others stand by",
        on_fail=sites.logs,
        interval=0.1,
    )
    before = sites.world()
    assert (
        before is not None and coordination(sites, "east-b")["observed_routing"] == before["routing"]["name"]
    )

    sites.cut("east-b")
    cut = sites.cut_at["east-b"]
    old = wait_for(
        lambda: (c := coordination(sites, "east-b")).get("role") == "unknown" and c,
        timeout=TTL_S + 3,
        what="the cut active appliance stops",
        on_fail=sites.logs,
        interval=0.1,
    )
    stopped = time.time() - old["since_s"]  # by its own account
    new = wait_for(
        lambda: next((s for s in others if coordination(sites, s).get("role") == "leader"), None),
        timeout=TTL_S + 5,
        what="a standby takes over",
        on_fail=sites.logs,
        interval=0.1,
    )
    role = coordination(sites, new)  # read first: the call itself takes a while
    took_over = time.time() - role["since_s"]
    assert cut < stopped < took_over, ("the new leader overlapped the old one", cut, stopped, took_over)
    assert took_over - cut <= TTL_S + 1.5
    time.sleep(1.5)
    after = sites.world()
    assert after is not None
    # Fenced with the new token, re-verified and kept: nothing moved, nothing re-applied.
    assert (after["routing"], after["by"]) == (before["routing"], before["by"])
    assert after["token"] == coordination(sites, new)["token"] > before["token"]
    assert after["fenced_by"] == new
    assert not [e for e in sites.world_log() if e["by"] == "east-b" and e["at"] > cut]
    sites.heal("east-b")
    wait_for(
        lambda: coordination(sites, "east-b").get("role") == "follower",
        timeout=15,
        what="the returning member of the pair follows",
        on_fail=sites.logs,
        interval=0.1,
    )
