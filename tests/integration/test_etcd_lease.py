"""The etcd leader lease against a real three-member cluster on loopback.

Appliances here are :class:`~failover.etcd.EtcdLease` loops, in this process
or (to be SIGKILLed) in a child process. "Acting" is an ``apply`` through a
:class:`~failover.etcd.FencedActuator` onto one shared
:class:`~failover.actuators.base.NullActuator`, which refuses tokens older
than the newest it obeyed; every admitted call is recorded with who made it,
its token and when, so the tests can check that no two leaders ever act in
overlapping windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from appliance.clock import SystemClock
from failover.actuators.base import Actuator, NullActuator, StaleToken
from failover.coordination.etcd import Etcd
from failover.etcd import EtcdLease, Fence, Gateway, NotLeader
from failover.routing import Routing
from tests.integration import test_etcd_cluster as support
from tests.integration.test_etcd_cluster import EtcdCluster, needs_etcd

cluster = support.cluster  # the module-scoped three-member cluster fixture

pytestmark = [needs_etcd, pytest.mark.slow, pytest.mark.timeout(60)]

TTL = 2
RETRY = 0.2
NORMAL = Routing("normal", "primary", 1, fenced_sets=frozenset({2}))
FAILOVER = Routing("failover", "backup", 2, fenced_sets=frozenset({1}))
ROUTINGS = {"normal": NORMAL, "failover": FAILOVER}

CHILD = r"""
import asyncio, json, sys
from failover.etcd import EtcdLease, Gateway
endpoints, domain, name, ttl, retry = sys.argv[1].split(","), sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
async def main():
    lease = EtcdLease(Gateway(endpoints, timeout_s=0.5), domain=domain, appliance=name, ttl_s=ttl, retry_s=retry)
    while True:
        await lease.cycle()
        s = lease.leadership()
        print(json.dumps({"role": s.role, "token": s.token, "may_act": lease.may_act()}), flush=True)
        await asyncio.sleep(ttl / 3 if s.role == "leader" else retry)
asyncio.run(main())
"""


@dataclass
class Recorder:
    """The shared real edge: a token-checking NullActuator, plus who acted when."""

    inner: NullActuator = field(default_factory=NullActuator)
    acts: list[tuple[str, int, float]] = field(default_factory=list)
    refused: list[tuple[str, int]] = field(default_factory=list)


class Tagged(Actuator):
    """One appliance's path to the shared edge."""

    timeout_s = 0.5  # in memory: instant; an apply starts only if the lease view outlasts this

    def __init__(self, recorder: Recorder, who: str) -> None:
        self.recorder, self.who, self.name = recorder, who, "null"

    async def apply(self, routing: Routing, token: int) -> None:
        try:
            await self.recorder.inner.apply(routing, token)
        except StaleToken:
            self.recorder.refused.append((self.who, token))
            raise
        self.recorder.acts.append((self.who, token, time.monotonic()))

    async def verify(self, routing: Routing) -> list[str]:
        return await self.recorder.inner.verify(routing)

    async def fence(self, token: int) -> None:
        await self.recorder.inner.fence(token)


@dataclass
class Appliance:
    name: str
    lease: EtcdLease
    fence: Fence
    actuator: Actuator
    observed: list[tuple[str, int]] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def act_forever(self, routing: Routing) -> None:
        task = asyncio.current_task()
        while not (task is not None and task.cancelling()):  # a stop must never be swallowed
            with contextlib.suppress(NotLeader, StaleToken):
                await self.actuator.apply(routing, 0)
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.lease.gateway.close()


def appliance(name: str, endpoints: list[str], recorder: Recorder, domain: str) -> Appliance:
    gateway = Gateway(endpoints, timeout_s=0.5)
    lease = EtcdLease(gateway, domain=domain, appliance=name, ttl_s=TTL, retry_s=RETRY)
    holder: list[Appliance] = []

    def took_over(observed: str, token: int) -> None:
        holder[0].observed.append((observed, token))

    fence = Fence(lease, lambda: ROUTINGS, on_takeover=took_over)
    [actuator] = fence.wrap([Tagged(recorder, name)])
    a = Appliance(name, lease, fence, actuator)
    holder.append(a)
    return a


async def start(a: Appliance, routing: Routing) -> None:
    a.tasks = [asyncio.create_task(a.lease.run()), asyncio.create_task(a.act_forever(routing))]


async def wait_for(predicate: object, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what}: not within {timeout_s}s")


def windows(acts: list[tuple[str, int, float]]) -> dict[int, tuple[str, float, float]]:
    """token -> (who, first act, last act); fails if one token was used by two appliances."""
    found: dict[int, tuple[str, float, float]] = {}
    for who, token, at in acts:
        if token in found:
            owner, first, _last = found[token]
            assert owner == who, f"token {token} used by {owner} and {who}"
            found[token] = (owner, first, at)
        else:
            found[token] = (who, at, at)
    return found


def assert_no_overlap(acts: list[tuple[str, int, float]]) -> None:
    spans = sorted(windows(acts).items())
    for (t1, (w1, _f1, last1)), (t2, (w2, first2, _l2)) in zip(spans, spans[1:], strict=False):
        assert last1 < first2, (
            f"token {t1} ({w1}) acted until {last1}, after token {t2} ({w2}) began {first2}"
        )
    times = [at for _w, _t, at in acts]
    tokens = [t for _w, t, _a in acts]
    assert tokens == sorted(tokens) and times == sorted(times)


# ---------------------------------------------------------------------------------------------


@pytest.fixture
def domain(request: pytest.FixtureRequest) -> str:
    return request.node.name.replace("_", "-")[:50]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def run_async(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """No asyncio plugin here: each test runs its own event loop (pytest sees the fixtures)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


def child(cl: EtcdCluster, domain: str, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, ",".join(cl.endpoints), domain, name, str(TTL), str(RETRY)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )


def read_until_role(proc: subprocess.Popen[str], role: str, timeout_s: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        doc = json.loads(line)
        if doc["role"] == role:
            return doc
    raise AssertionError(f"child never reported role {role}")


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)


@run_async
async def test_killed_leader_is_replaced_within_ttl_and_returns_passive(
    cluster: EtcdCluster, domain: str, recorder: Recorder, children: list[subprocess.Popen[str]]
) -> None:
    old = child(cluster, domain, "appliance-a")
    children.append(old)
    first = await asyncio.to_thread(read_until_role, old, "leader", 10)
    standby = appliance("appliance-b", cluster.endpoints, recorder, domain)
    await start(standby, FAILOVER)
    try:
        await wait_for(lambda: standby.lease.state.holder is not None, 5, "standby sees the leader")
        assert standby.lease.state.holder == "appliance-a"
        assert not recorder.acts
        await asyncio.sleep(TTL / 3 + 0.05)  # kill at a random point after a renewal
        old.send_signal(signal.SIGKILL)
        old.wait()
        took = await wait_for(standby.lease.may_act, TTL + 3, "standby takes over")
        print(f"takeover after SIGKILL: {took:.2f}s (ttl {TTL}s, retry {RETRY}s)")
        assert took <= TTL + RETRY + 0.75  # TTL + one cycle + etcd's 0.5 s expiry sweep + noise
        assert standby.lease.state.token is not None and standby.lease.state.token > int(first["token"])  # type: ignore[call-overload]
        await wait_for(lambda: recorder.acts, 2, "the new leader acts")
        assert standby.observed and standby.observed[0][1] == standby.lease.state.token

        returned = child(cluster, domain, "appliance-a")
        children.append(returned)
        seen = await asyncio.to_thread(read_until_role, returned, "follower", 10)
        assert seen["may_act"] is False
        assert returned.stdout is not None
        for _ in range(10):  # several cycles: it stays passive
            doc = json.loads(await asyncio.to_thread(returned.stdout.readline))
            assert doc["role"] == "follower" and doc["may_act"] is False
        assert standby.lease.may_act()
    finally:
        await standby.stop()


@run_async
async def test_minority_partition_stops_the_old_leader_before_the_new_one_acts(
    cluster: EtcdCluster, domain: str, recorder: Recorder
) -> None:
    cut = cluster.raft_leader()  # the hardest member to lose: the majority must elect a new raft leader
    others = [cluster.url(n) for n in cluster.names if n != cut]
    old = appliance("appliance-a", [cluster.url(cut)], recorder, domain)
    new = appliance("appliance-b", others, recorder, domain)
    await start(old, NORMAL)
    try:
        await wait_for(old.lease.may_act, 5, "first leader")
        await start(new, FAILOVER)
        await wait_for(lambda: new.lease.state.holder is not None, 5, "standby sees the leader")
        await wait_for(lambda: len(recorder.acts) > 10, 5, "the first leader acts")
        old_token = old.lease.state.token
        cluster.pause(cut)  # the old leader's only member is cut from the majority
        paused_at = time.monotonic()
        stopped = await wait_for(lambda: not old.lease.may_act(), TTL + 1, "the old leader stops acting")
        taken = await wait_for(new.lease.may_act, TTL + 6, "the majority's appliance takes over")
        await wait_for(lambda: recorder.acts[-1][0] == "appliance-b", 2, "the new leader acts")
        print(f"partition: old leader stopped after {stopped:.2f}s, new leader after {taken:.2f}s")
        old_acts = [at for who, _t, at in recorder.acts if who == "appliance-a"]
        new_acts = [at for who, _t, at in recorder.acts if who == "appliance-b"]
        assert max(old_acts) < min(new_acts)
        assert max(old_acts) - paused_at < TTL  # it stopped within its own lease
        assert (
            new.lease.state.token is not None and old_token is not None and new.lease.state.token > old_token
        )
        assert new.observed == [("normal", new.lease.state.token)]  # it re-read what the old leader left

        new_token = new.lease.state.token
        cluster.resume(cut)  # the old leader comes back: it must demote itself before anything else
        resumed_at = time.monotonic()
        await wait_for(lambda: old.lease.state.role != "unknown", 5, "the old leader hears from etcd")
        assert old.lease.state.token != old_token  # demoted: never resumed its old tenure
        await asyncio.sleep(1.5)
        late = [(who, tok) for who, tok, at in recorder.acts if who == "appliance-a" and at > resumed_at]
        if late:
            # etcd < 3.4.28 / 3.5.11 (Debian 12 ships 3.4.23): the resumed member, still believing it
            # is the raft leader, revokes leases it thinks expired -- including the new leader's
            # (etcd-io/etcd#15247, fixed by #16822). The old appliance then wins a *new* election
            # with a larger token, and the fencing rule is what keeps the edge consistent.
            print(f"etcd revoked the current leader's lease on resume; {len(late)} acts under new token(s)")
            assert all(tok > new_token for _w, tok in late)
            assert not new.lease.may_act()  # the new leader saw its key go and stopped
        else:
            assert old.lease.state.holder == "appliance-b" and old.lease.state.role == "follower"
            assert not recorder.refused  # the old leader never even tried: it knew it had lost
        assert_no_overlap(recorder.acts)
    finally:
        if cut in cluster.paused:
            cluster.resume(cut)
        await old.stop()
        await new.stop()
        cluster.wait_healthy()


@run_async
async def test_etcd_paused_and_resumed(cluster: EtcdCluster, domain: str, recorder: Recorder) -> None:
    a = appliance("appliance-a", cluster.endpoints, recorder, domain)
    b = appliance("appliance-b", cluster.endpoints, recorder, domain)
    await start(a, NORMAL)
    await wait_for(a.lease.may_act, 5, "first leader")
    await start(b, NORMAL)
    try:
        await wait_for(lambda: b.lease.state.holder is not None, 5, "standby")
        before = a.lease.state.token
        for name in cluster.names:  # the whole etcd cluster freezes
            cluster.pause(name)
        paused_at = time.monotonic()
        await wait_for(lambda: not a.lease.may_act(), TTL + 1, "the leader stops acting")
        await wait_for(
            lambda: a.lease.state.role == "unknown" and b.lease.state.role == "unknown",
            TTL + 1,
            "both unknown",
        )
        assert (
            "etcd unreachable" in a.lease.state.detail
            and "keeping the current routing" in a.lease.state.detail
        )
        await asyncio.sleep(1.0)
        frozen = [at for _w, _t, at in recorder.acts if at > paused_at + TTL]
        assert not frozen, "an appliance acted while etcd was paused"
        for name in cluster.names:
            cluster.resume(name)
        await wait_for(lambda: a.lease.may_act() or b.lease.may_act(), TTL + 5, "a leader again")
        await asyncio.sleep(TTL)
        assert sum(x.lease.may_act() for x in (a, b)) == 1
        leader = a if a.lease.may_act() else b
        assert (
            leader.lease.state.token is not None and before is not None and leader.lease.state.token >= before
        )
        assert_no_overlap(recorder.acts)
    finally:
        for name in list(cluster.paused):
            cluster.resume(name)
        await a.stop()
        await b.stop()


@run_async
async def test_clean_stop_hands_over_at_once(cluster: EtcdCluster, domain: str, recorder: Recorder) -> None:
    a = appliance("appliance-a", cluster.endpoints, recorder, domain)
    b = appliance("appliance-b", cluster.endpoints, recorder, domain)
    await start(a, NORMAL)
    await wait_for(a.lease.may_act, 5, "first leader")
    await start(b, NORMAL)
    try:
        await wait_for(lambda: b.lease.state.holder is not None, 5, "standby")
        for task in a.tasks:
            task.cancel()
        await asyncio.gather(*a.tasks, return_exceptions=True)
        await a.lease.release()
        took = await wait_for(b.lease.may_act, TTL, "handover after a revoke")
        assert took < RETRY + 0.5
    finally:
        await a.stop()
        await b.stop()


def test_clock_is_system() -> None:  # the lease uses CLOCK_BOOTTIME, which must tick like monotonic
    from failover.etcd import boottime

    m0, b0 = SystemClock().monotonic(), boottime()
    time.sleep(0.05)
    assert abs((SystemClock().monotonic() - m0) - (boottime() - b0)) < 0.01


@run_async
async def test_a_black_holed_member_does_not_starve_the_others(cluster: EtcdCluster) -> None:
    """A partitioned member accepts nothing and refuses nothing: the budget must reach the others."""
    import socket

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)  # connections queue in the kernel and are never answered
    first = f"http://127.0.0.1:{hole.getsockname()[1]}"
    gateway = Gateway([first, *cluster.endpoints], timeout_s=0.6)
    try:
        started = time.monotonic()
        assert await gateway.members()  # answered by a live member within the one budget
        assert time.monotonic() - started < 0.6
        started = time.monotonic()
        await gateway.members()  # and the next call starts where the answer came from
        assert time.monotonic() - started < 0.2
    finally:
        await gateway.close()
        hole.close()


@run_async
async def test_peer_views_are_shared_through_etcd_and_garbage_is_counted(
    cluster: EtcdCluster, domain: str
) -> None:
    """Two appliances publish under their own session leases; a third's garbage is ignored and counted."""
    from failover.etcd.peers import PeerViews, PeerVoter

    gateways = [Gateway(cluster.endpoints, timeout_s=0.6) for _ in range(2)]
    leases = [
        EtcdLease(g, domain=domain, appliance=f"a{i}", ttl_s=TTL, retry_s=RETRY)
        for i, g in enumerate(gateways)
    ]
    seen = {"a0": {"primary": "down", "east": "up"}, "a1": {"primary": "up", "west": "up"}}
    views = [
        PeerViews(g, lease, domain=domain, appliance=f"a{i}", site=("east", "west")[i],
                  verdicts=functools.partial(seen.__getitem__, f"a{i}"), interval_s=0.2, clock=time.monotonic)
        for i, (g, lease) in enumerate(zip(gateways, leases, strict=True))
    ]  # fmt: skip
    try:
        for lease in leases:
            await lease.cycle()
        lease_id = leases[1].state.lease_id
        assert lease_id is not None
        await gateways[1].put(f"/hotsite/{domain}/views/intruder", "{not json", lease_id)
        for v in views:
            await v.publish()
        await views[0].refresh()
        assert sorted(v.appliance for v, _ in views[0].current()) == ["a0", "a1"]
        assert views[0].malformed == 1
        vote = await PeerVoter(views[0], "primary").vote()
        assert (vote.primary_alive, vote.detail) == (True, "peers: a1@west (up) still sees primary")
        # a1 goes away (its lease revoked, as after a clean stop): its view goes with it.
        await leases[1].release()
        await views[0].refresh()
        assert [v.appliance for v, _ in views[0].current()] == ["a0"]
        vote = await PeerVoter(views[0], "primary").vote()
        assert (vote.primary_alive, vote.detail) == (None, "peers: no other appliance's view is fresh")
    finally:
        await leases[0].release()
        for g in gateways:
            await g.close()


@run_async
async def test_a_decision_taken_before_the_takeover_is_never_carried_out(
    cluster: EtcdCluster, domain: str
) -> None:
    """A reconcile or runbook under way when this appliance takes over carries a pre-takeover epoch."""
    gateway = Gateway(cluster.endpoints, timeout_s=0.6)
    lease = EtcdLease(gateway, domain=domain, appliance="a", ttl_s=TTL, retry_s=RETRY)
    world = NullActuator()
    world.timeout_s = 0.5  # in memory; an apply starts only if the lease view (< TTL) outlasts this
    fence = Fence(
        lease, lambda: ROUTINGS, on_takeover=lambda observed, token: 7
    )  # the engine adopted: epoch 7
    [actuator] = fence.wrap([world])
    try:
        await lease.cycle()
        assert lease.may_act()
        with pytest.raises(NotLeader, match="decided at epoch 6, before this appliance took over"):
            await actuator.apply(FAILOVER, 6)  # the takeover re-read happens inside this very call
        assert world.applied == [] and fence.observed == "mixed"  # nothing applied yet: not a known routing
        await actuator.apply(FAILOVER, 7)  # decided after adopting: carried out with the etcd token
        assert [(r.name, t) for r, t in world.applied] == [("failover", lease.leadership().token)]
    finally:
        await lease.release()
        await gateway.close()


@run_async
async def test_with_quorum_lost_no_apply_starts_later_than_the_fresh_lease_bound(
    cluster: EtcdCluster, domain: str, recorder: Recorder
) -> None:
    """Two of three members paused: the leader's applies stop once the lease view is too short for one.

    The bound (failover/lease.py ``may_apply``): an apply starts only if it can
    end before the lease view does, so no later than ``ttl - margin - timeout``
    after the last renewal was sent (which was before the pause); then the
    fence renews first, the renewal fails, and nothing starts again.
    """
    a = appliance("appliance-a", cluster.endpoints, recorder, domain)
    await start(a, NORMAL)
    try:
        await wait_for(lambda: a.lease.may_act() and recorder.acts, 5, "the leader acts")
        followers = [n for n in cluster.names if n != cluster.raft_leader()]
        await asyncio.sleep(0.3)
        for name in followers:
            cluster.pause(name)
        paused_at = time.monotonic()
        await wait_for(lambda: a.lease.state.role == "unknown", TTL + 2, "the leader stands down")
        await asyncio.sleep(0.5)
        late = [at - paused_at for _w, _t, at in recorder.acts if at > paused_at]
        bound = TTL - a.lease.margin_s - Tagged.timeout_s
        print(
            f"applies after quorum loss: {len(late)}, the last {max(late, default=0):.2f}s after (bound {bound:.2f}s)"
        )
        assert max(late, default=0.0) <= bound + 0.05, (late, bound)
    finally:
        for name in list(cluster.paused):
            cluster.resume(name)
        await a.stop()
        cluster.wait_healthy()


@run_async
async def test_the_health_check_counts_healthy_members_and_names_the_raft_leader(
    cluster: EtcdCluster,
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from appliance import config

    text = (
        '[sites.primary]\nrole = "primary"\nsbc = "10.0.0.1:5060"\nkamailio_set = 1\n'
        '[sites.backup]\nrole = "backup"\nsbc = "10.0.0.2:5060"\nkamailio_set = 2\n'
        '[coordination]\nbackend = "etcd"\nrequest_timeout_s = 0.5\nendpoints = ['
        + ", ".join(f'"{e}"' for e in cluster.endpoints)
        + "]\n"
    )
    registry = CollectorRegistry()
    coordination = Etcd(config.parse(text).coordination, appliance="a", registry=registry)
    try:
        health = await coordination.check_health()
        leader = cluster.raft_leader()
        assert (health["healthy"], health["total"], health["problem"]) == (3, 3, None), health
        assert health["raft_leader"] == cluster.url(leader)
        follower = next(n for n in cluster.names if n != leader)
        cluster.pause(follower)
        health = await coordination.check_health()
        assert health["healthy"] == 2 and "one more loss stops coordination" in health["problem"], health
        down = next(m for m in health["members"] if m["endpoint"] == cluster.url(follower))
        assert not down["healthy"] and "no answer" in down["error"]
        metrics = generate_latest(registry).decode()
        assert "hotsite_coordination_etcd_members_healthy 2.0" in metrics
        assert f'hotsite_coordination_etcd_member_up{{endpoint="{cluster.url(follower)}"}} 0.0' in metrics
        assert coordination.view()["etcd_health"]["healthy"] == 2
    finally:
        for name in list(cluster.paused):
            cluster.resume(name)
        await coordination.gateway.close()
        cluster.wait_healthy()
