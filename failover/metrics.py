"""The failover engine's metrics: its state, the routing applied, the fencing token.

The coordination backends' ``hotsite_coordination_*`` are in
:mod:`failover.etcd.metrics` (only the etcd backend exposes them); the witness
agent's ``hotsite_witness_*`` in :mod:`failover.witness.metrics` (another program).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from failover.engine import ENGINE_STATES

ROUTINGS = ("normal", "failover", "unknown")


class FailoverMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.state = Gauge(
            "hotsite_failover_state",
            "The failover engine's state (one series per state, 1 for the current one).",
            ["state"],
            registry=registry,
        )
        self.routing = Gauge(
            "hotsite_failover_routing",
            "Which routing is applied (1 for the current one): normal, failover or unknown.",
            ["routing"],
            registry=registry,
        )
        self.epoch = Gauge(
            "hotsite_failover_epoch", "Fencing token of the newest routing decision.", registry=registry
        )

    def show(self, state: str, routing: str, epoch: int) -> None:
        """One series per engine state and per routing, 1 for the current one."""
        for candidate in ENGINE_STATES:
            self.state.labels(state=candidate).set(1 if candidate == state else 0)
        for candidate in ROUTINGS:
            self.routing.labels(routing=candidate).set(1 if candidate == routing else 0)
        self.epoch.set(epoch)
