"""The ``hotsite_coordination_*`` metrics of the etcd backend."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from failover import lease as core
from failover.etcd.gateway import OPS


class CoordinationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.leader = Gauge(
            "hotsite_coordination_leader", "1 while this appliance holds the lease", registry=registry
        )
        self.reachable = Gauge(
            "hotsite_coordination_reachable", "1 while etcd answers clearly", registry=registry
        )
        self.token = Gauge("hotsite_coordination_token", "Fencing token held (0: none)", registry=registry)
        self.members = Gauge(
            "hotsite_coordination_members", "etcd cluster members last listed", registry=registry
        )
        self.changes = Counter(
            "hotsite_coordination_role_changes_total", "Role changes", ["role"], registry=registry
        )
        self.member_up = Gauge(
            "hotsite_coordination_etcd_member_up",
            "1 while this etcd member answers its status with a raft leader and no alarm",
            ["endpoint"],
            registry=registry,
        )
        self.healthy = Gauge(
            "hotsite_coordination_etcd_members_healthy",
            "etcd members that answered healthy at the last check",
            registry=registry,
        )
        self.has_leader = Gauge(
            "hotsite_coordination_etcd_has_leader",
            "1 while a healthy member names a raft leader",
            registry=registry,
        )
        self.latency = Histogram(
            "hotsite_coordination_request_seconds",
            "etcd gateway round trips",
            ["op"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )

    def observe(self, op: str, seconds: float) -> None:
        self.latency.labels(op=op if op in OPS else "other").observe(seconds)

    def update(self, state: core.LeaseState) -> None:
        self.leader.set(1 if state.role == "leader" else 0)
        self.reachable.set(1 if state.reachable else 0)
        self.token.set(state.token or 0)
        self.changes.labels(role=state.role).inc()
