"""A new leader fences every actuator before it reads the routing back, and acts on nothing until it has.

The real :class:`failover.etcd.Fence` over a real :class:`failover.etcd.EtcdLease`
whose state is set from the pure lease core on a simulated clock (no etcd:
the gateway is never called).
"""

from __future__ import annotations

import asyncio

import pytest

from failover import lease as core
from failover.actuators.base import ActuatorError, NullActuator
from failover.etcd import EtcdLease, EtcdUnavailable, Fence, Gateway, NotLeader
from failover.routing import Routing

NORMAL = Routing("normal", "primary", 1, {"95588": 1}, active_sets=frozenset({1}))
FAILOVER = Routing("failover", "backup", 2, {"95588": 2}, frozenset({1}))
TTL = 10


class Edge(NullActuator):
    """A NullActuator that writes what it is asked into a shared journal; can be made to fail."""

    def __init__(self, name: str, journal: list[tuple[str, str, object]]) -> None:
        super().__init__()
        self.name, self.journal = name, journal
        self.fail_fence: ActuatorError | None = None

    async def fence(self, token: int) -> None:
        self.journal.append((self.name, "fence", token))
        if self.fail_fence is not None:
            raise self.fail_fence
        await super().fence(token)

    async def verify(self, routing: Routing) -> list[str]:
        self.journal.append((self.name, "verify", routing.name))
        return [] if routing.name == "normal" else ["not failover"]


def leader_lease(token: int, now: list[float]) -> EtcdLease:
    lease = EtcdLease(
        Gateway(["http://127.0.0.1:9"]), domain="d", appliance="a", ttl_s=TTL, clock=lambda: now[0]
    )
    state = core.granted(lease.state, 7, TTL, sent_at=now[0], margin_s=lease.margin_s)
    lease.state = core.acquired(state, token, now=now[0])
    return lease


def gate(lease: EtcdLease, edges: list[Edge], taken: list[tuple[str, int]]) -> tuple[Fence, list]:
    fence = Fence(
        lease,
        lambda: {"normal": NORMAL, "failover": FAILOVER},
        on_takeover=lambda observed, token: taken.append((observed, token)),
    )
    return fence, fence.wrap(edges)


def test_every_actuator_is_fenced_before_anything_is_read_back() -> None:
    journal: list[tuple[str, str, object]] = []
    edges = [Edge("kamailio", journal), Edge("carrier", journal)]
    taken: list[tuple[str, int]] = []
    fence, wrapped = gate(leader_lease(137, [100.0]), edges, taken)

    asyncio.run(wrapped[0].apply(NORMAL, 0))
    assert journal[:2] == [("kamailio", "fence", 137), ("carrier", "fence", 137)]
    assert [kind for _, kind, _ in journal[2:]] == ["verify", "verify"]  # normal matched on both
    assert taken == [("normal", 137)] and fence.fenced_token == 137
    assert [e.highest_token for e in edges] == [137, 137]
    assert edges[0].applied == [(NORMAL, 137)]  # the lease's token, not the engine's epoch


def test_a_takeover_that_cannot_fence_reads_nothing_acts_on_nothing_and_is_retried() -> None:
    journal: list[tuple[str, str, object]] = []
    edges = [Edge("kamailio", journal), Edge("carrier", journal)]
    edges[1].fail_fence = ActuatorError("carrier: --fence exited 2: unknown option")
    taken: list[tuple[str, int]] = []
    fence, wrapped = gate(leader_lease(137, [100.0]), edges, taken)

    with pytest.raises(NotLeader, match="cannot fence carrier"):
        asyncio.run(wrapped[0].apply(FAILOVER, 0))
    assert [kind for _, kind, _ in journal] == ["fence", "fence"]  # no verify, no apply
    assert not taken and edges[0].applied == [] and fence.fence_error
    edges[1].fail_fence = None
    asyncio.run(wrapped[0].apply(FAILOVER, 0))  # the next attempt takes over completely
    assert taken == [("normal", 137)] and edges[0].applied == [(FAILOVER, 137)] and fence.fence_error is None


def test_a_world_fenced_by_a_newer_leader_makes_this_one_stand_down() -> None:
    journal: list[tuple[str, str, object]] = []
    edges = [Edge("kamailio", journal)]
    edges[0].highest_token = 200  # a newer leader already fenced it
    taken: list[tuple[str, int]] = []
    _, wrapped = gate(leader_lease(137, [100.0]), edges, taken)
    with pytest.raises(NotLeader, match="a newer leader already fenced kamailio"):
        asyncio.run(wrapped[0].apply(NORMAL, 0))
    assert not taken and edges[0].applied == []


def test_no_fence_without_a_fresh_lease() -> None:
    now = [100.0]
    lease = leader_lease(137, now)
    journal: list[tuple[str, str, object]] = []
    edges = [Edge("kamailio", journal)]
    _, wrapped = gate(lease, edges, [])
    now[0] += TTL  # the lease view ran out
    with pytest.raises(NotLeader):
        asyncio.run(wrapped[0].fence(0))
    assert journal == []


class Etcd:
    """The two gateway calls a leader's renewal makes; ``down`` makes them fail as with no quorum."""

    def __init__(self, token: int, lease_id: int = 7) -> None:
        self.token, self.lease_id, self.down = token, lease_id, False
        self.keepalives = 0

    async def keepalive(self, lease_id: int) -> int:
        self.keepalives += 1
        if self.down:
            raise EtcdUnavailable("no leader")
        return TTL

    async def create_if_absent(self, key: str, value: str, lease_id: int) -> tuple[bool, dict[str, object]]:
        return False, {"create_revision": self.token, "lease": self.lease_id, "value": value}


def lease_on(etcd: Etcd, now: list[float]) -> EtcdLease:
    lease = EtcdLease(etcd, domain="d", appliance="a", ttl_s=TTL, clock=lambda: now[0])  # type: ignore[arg-type]
    state = core.granted(lease.state, etcd.lease_id, TTL, sent_at=now[0], margin_s=lease.margin_s)
    lease.state = core.acquired(state, etcd.token, now=now[0])
    return lease


def test_an_apply_the_lease_view_is_too_short_for_renews_first() -> None:
    now, etcd = [100.0], Etcd(137)
    lease = lease_on(etcd, now)
    journal: list[tuple[str, str, object]] = []
    edge = Edge("carrier", journal)
    edge.timeout_s = 4.0
    _, [wrapped] = gate(lease, [edge], [])
    asyncio.run(wrapped.apply(NORMAL, 0))  # fresh: 9.5 s left, the apply may take 4 s
    assert etcd.keepalives == 0 and lease.refreshes == 0
    now[0] += 6.0  # 3.5 s left: too little for a 4 s apply
    asyncio.run(wrapped.apply(FAILOVER, 0))
    assert etcd.keepalives == 1 and lease.refreshes == 1
    assert edge.applied[-1] == (FAILOVER, 137)


def test_no_apply_after_a_failed_renewal_and_until_a_fresh_one() -> None:
    now, etcd = [100.0], Etcd(137)
    lease = lease_on(etcd, now)
    edge = Edge("carrier", [])
    edge.timeout_s = 4.0
    _, [wrapped] = gate(lease, [edge], [])
    asyncio.run(wrapped.apply(NORMAL, 0))
    etcd.down = True  # quorum lost
    now[0] += 6.0  # still inside the lease (3.5 s left) but too little for the apply: renew first
    with pytest.raises(NotLeader):
        asyncio.run(wrapped.apply(FAILOVER, 0))
    now[0] += 0.1
    with pytest.raises(NotLeader):  # inside the lease, but a renewal failed: nothing starts
        asyncio.run(wrapped.apply(FAILOVER, 0))
    assert edge.applied == [(NORMAL, 137)]
    etcd.down = False
    asyncio.run(lease.cycle())  # a fresh renewal, the key read back as ours
    asyncio.run(wrapped.apply(FAILOVER, 0))
    assert edge.applied == [(NORMAL, 137), (FAILOVER, 137)]


def test_an_apply_longer_than_any_lease_view_never_starts() -> None:
    now, etcd = [100.0], Etcd(137)
    lease = lease_on(etcd, now)
    edge = Edge("carrier", [])
    edge.timeout_s = TTL
    _, [wrapped] = gate(lease, [edge], [])
    with pytest.raises(NotLeader, match="an apply may take 10s"):
        asyncio.run(wrapped.apply(NORMAL, 0))
    assert edge.applied == [] and etcd.keepalives == 1
