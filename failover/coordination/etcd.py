"""``backend = "etcd"``: one leader per routing domain among several appliances, fencing tokens from etcd.

The pieces live in :mod:`failover.etcd` (the gateway client, the election loop,
the voter, the fence); this module wires them for the daemon behind the
:class:`~failover.coordination.base.Coordination` interface, and adds the two
slow watches: the cluster's members and every member's health.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from failover import plans
from failover.actuators.base import Actuator
from failover.coordination.base import Coordination, Job, NotLeader, Recorder, RoleListener, Takeover
from failover.etcd import (
    MIN_MEMBERS_FOR_AUTO,
    CoordinationMetrics,
    EtcdError,
    EtcdLease,
    EtcdVoter,
    Fence,
    Gateway,
    boottime,
    read_credentials,
    tls_context,
)
from failover.etcd.peers import PeerViews, PeerVoter
from failover.routing import Routing
from failover.thirdvote import Voter

if TYPE_CHECKING:
    from failover.settings import CoordinationSection
    from failover.settings import FailoverConfig as Config

TAKEOVER_RETRY_S = 1.0  # a takeover that could not fence every actuator is retried this often
HEALTH_INTERVAL_S = 10.0  # how often every member is asked for its own status


class Etcd(Coordination):
    """Only the holder of the domain's etcd lease acts, and every actuator call carries its token.

    With no ``failover.witness`` (``peers_are_witness``), the appliances at the
    other sites are the witness: each publishes its site verdicts and the leader
    fails over only when every fresh peer judges the primary down.
    """

    name = "etcd"
    epoch_is_token = False  # the lease's create revision is the token; a takeover re-reads the world

    def __init__(
        self,
        section: CoordinationSection,
        *,
        appliance: str,
        site: str = "",
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = boottime,
        primary: str = "",
        peers_are_witness: bool = False,
        routings: Callable[[], dict[str, Routing]] = dict,
        record: Recorder = lambda kind, message, data: None,
        step_timeout_s: float | None = None,
    ) -> None:
        self.section = section
        self.primary = primary
        self.peers_are_witness = peers_are_witness
        self.routings = routings
        self.record = record
        self.step_timeout_s = step_timeout_s
        self.metrics = CoordinationMetrics(registry or CollectorRegistry())
        credentials = read_credentials(section.credentials_file) if section.credentials_file else None
        self.gateway = Gateway(
            section.endpoints,
            timeout_s=section.request_timeout_s,
            verify=tls_context(section),
            credentials=credentials,
            observe=self.metrics.observe,
        )
        self.lease = EtcdLease(
            self.gateway,
            domain=section.domain,
            appliance=appliance,
            ttl_s=section.ttl_s,
            retry_s=section.retry_s,
            site=site,
            clock=clock,
        )
        self.lease.on_change(self.metrics.update)
        self.members: list[str] | None = None
        self.health: dict[str, Any] | None = None  # the last health check of every member
        self.peers: PeerViews | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._fence: Fence | None = None

    @classmethod
    def from_config(cls, config: Config, *, registry: CollectorRegistry, record: Recorder) -> Etcd:
        return cls(
            config.coordination,
            appliance=config.appliance.name,
            site=config.my_site,
            registry=registry,
            primary=config.primary[0],
            peers_are_witness=config.failover.witness is None,
            routings=lambda: plans.known_routings(config),
            record=record,
            step_timeout_s=config.failover.step_timeout_s,
        )

    def members_problem(self) -> str | None:
        if self.members is None:
            return None  # not listed yet: the config check already counted the endpoints
        if len(self.members) < MIN_MEMBERS_FOR_AUTO:
            return (
                f"the etcd cluster has {len(self.members)} member(s): no automatic failover with fewer than 3"
            )
        return None

    def peer_views(self, verdicts: Callable[[], dict[str, str]]) -> PeerViews:
        """This appliance's published site verdicts and the other appliances' (run it as a task)."""
        self.peers = PeerViews(
            self.gateway,
            self.lease,
            domain=self.section.domain,
            appliance=self.lease.state.me,
            site=self.lease.site,
            verdicts=verdicts,
            interval_s=self.section.views_interval_s,
            clock=self.lease.now,
        )
        return self.peers

    def voter(self, witness: Voter, site_verdicts: Callable[[], dict[str, str]]) -> EtcdVoter:
        """Only the leader passes on its witness's word; with no witness, the other sites' views are it."""
        if self.peers_are_witness:
            witness = PeerVoter(self.peer_views(site_verdicts), self.primary)
        return EtcdVoter(self.lease, witness, members_ok=self.members_problem)

    def guard(self, actuators: Sequence[Actuator], *, on_takeover: Takeover) -> list[Actuator]:
        self._fence = Fence(
            self.lease,
            self.routings,
            on_takeover=on_takeover,
            record=self.record,
            step_timeout_s=self.step_timeout_s,
        )
        return self._fence.wrap(actuators)

    def jobs(self) -> dict[str, Job]:
        found: dict[str, Job] = {"peer views": self.peers.run} if self.peers is not None else {}
        found["coordination"] = self.run
        return found

    def on_change(self, listener: RoleListener) -> None:
        self.lease.on_change(lambda state: listener(state.role, state.detail))

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.lease.run(), name="etcd-lease"),
            asyncio.create_task(self._watch_members(), name="etcd-members"),
            asyncio.create_task(self._watch_health(), name="etcd-health"),
        ]
        if self._fence is not None:
            self._tasks.append(asyncio.create_task(self._takeovers(self._fence), name="etcd-takeover"))

    async def run(self) -> None:
        """For the daemon's supervisor: start, run until cancelled, then release the lease."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def _watch_members(self) -> None:
        while True:
            with contextlib.suppress(EtcdError):
                self.members = await self.gateway.members()
                self.metrics.members.set(len(self.members))
            await asyncio.sleep(60.0)

    async def _watch_health(self) -> None:
        while True:
            await self.check_health()
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def check_health(self) -> dict[str, Any]:
        """Ask every member for its own status; the summary is in the status and the metrics.

        A member is healthy when it answers, names a raft leader and reports no
        alarm. Fewer healthy members than a majority: the cluster cannot elect
        or renew (no automatic failover); one down: one more loss stops it.
        """
        endpoints = [str(e).rstrip("/") for e in self.section.endpoints]
        answers = await asyncio.gather(
            *(self.gateway.member_status(e, self.section.request_timeout_s) for e in endpoints),
            return_exceptions=True,
        )
        members = []
        for endpoint, answer in zip(endpoints, answers, strict=True):
            if isinstance(answer, asyncio.CancelledError):
                raise answer
            if isinstance(answer, BaseException):
                members.append({"endpoint": endpoint, "healthy": False, "error": str(answer)[:200]})
                continue
            ok = answer["leader"] not in ("", "0") and not answer["errors"]
            is_leader = answer["leader"] == answer["member_id"]
            members.append({"endpoint": endpoint, "healthy": ok, **answer, "is_leader": is_leader})
        self.health = _health_summary(members, self.lease.now())
        for member in members:
            self.metrics.member_up.labels(endpoint=member["endpoint"]).set(1 if member["healthy"] else 0)
        self.metrics.healthy.set(self.health["healthy"])
        self.metrics.has_leader.set(1 if self.health["raft_leader"] else 0)
        return self.health

    async def _takeovers(self, fence: Fence) -> None:
        """Fence and re-read as soon as we become leader, not at the first action.

        A takeover that could not fence (an actuator unreachable) is tried again
        every second while this appliance leads: until it succeeds nothing is acted on.
        """
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TAKEOVER_RETRY_S):
                    await self.lease.changed.wait()
            self.lease.changed.clear()
            state = self.lease.leadership()
            if state.role == "leader" and state.token != fence.verified_token:
                with contextlib.suppress(NotLeader):
                    await fence.admit()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.section.request_timeout_s * 2):
                await self.lease.release()
        await self.gateway.close()

    def view(self) -> dict[str, Any]:
        state = self.lease.leadership()
        data = state.to_json(self.lease.now())
        data["backend"] = self.name
        data["members"] = self.members
        data["ttl_s"] = self.lease.ttl_s
        gate = self._fence
        # What this leadership's takeover read back; None until it is done. A routing read in an
        # earlier leadership is not shown as this one's: it would say "taken over" before the fence.
        current = gate is not None and state.token is not None and gate.verified_token == state.token
        data["observed_routing"] = gate.observed if current and gate is not None else None
        data["fenced_token"] = getattr(gate, "fenced_token", None)
        data["fence_error"] = getattr(gate, "fence_error", None)
        data["peers"] = self.peers.view() if self.peers else None
        data["etcd_health"] = self.health
        return data


def _health_summary(members: list[dict[str, Any]], now: float) -> dict[str, Any]:
    healthy = [m for m in members if m["healthy"]]
    leaders = {m["leader"] for m in healthy}
    majority = len(members) // 2 + 1
    problem = None
    if len(healthy) < majority:
        problem = f"{len(healthy)} of {len(members)} etcd members healthy: no majority, no leader election"
    elif len(healthy) == majority and len(members) > 1:
        problem = f"{len(healthy)} of {len(members)} etcd members healthy: one more loss stops coordination"
    elif len(leaders) > 1:
        problem = "etcd members name different raft leaders (an election under way)"
    return {
        "checked_at": round(now, 3),
        "healthy": len(healthy),
        "total": len(members),
        "raft_leader": next((m["endpoint"] for m in healthy if m.get("is_leader")), None),
        "problem": problem,
        "members": members,
    }
