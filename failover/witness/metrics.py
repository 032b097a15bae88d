"""The witness agent's metrics (``hotsite witness``'s own ``/metrics``, not the appliance daemon's).

Listed in the feature table (:mod:`appliance.features`) under failover, as another
program's, so the catalogue ``monitoring/METRICS.md`` names them too.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from appliance import httpd

OUTCOMES = httpd.OUTCOMES
PRIMARY_STATES = ("unknown", "alive", "down")
TARGET_STATES = ("unknown", "up", "down")


class WitnessMetrics:
    """The agent's Prometheus metrics, on the registry it is given."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "hotsite_witness_requests_total",
            "HTTP requests by outcome (bad_request: garbage that was refused).",
            ["outcome"],
            registry=registry,
        )
        self.primary_state = Gauge(
            "hotsite_witness_primary_state",
            "What the witness believes of the primary (one series per state, 1 for the current).",
            ["state"],
            registry=registry,
        )
        self.primary_changes = Counter(
            "hotsite_witness_primary_changes_total",
            "Times the witness's belief about the primary changed.",
            registry=registry,
        )
        self.target_state = Gauge(
            "hotsite_witness_target_state",
            "Judged state of each probe target (one series per state, 1 for the current).",
            ["target", "state"],
            registry=registry,
        )
        self.probes = Counter(
            "hotsite_witness_probes_total",
            "Probes run, by result reason.",
            ["target", "reason"],
            registry=registry,
        )
        self.round_age = Gauge(
            "hotsite_witness_round_age_seconds",
            "Seconds since the last probe round finished (what /vote reports as age_s).",
            registry=registry,
        )
        for outcome in OUTCOMES:
            self.requests.labels(outcome=outcome)
        self.set_primary(None)

    def set_primary(self, alive: bool | None) -> None:
        current = {None: "unknown", True: "alive", False: "down"}[alive]
        for state in PRIMARY_STATES:
            self.primary_state.labels(state=state).set(1 if state == current else 0)

    def set_target(self, target: str, state: str) -> None:
        for candidate in TARGET_STATES:
            self.target_state.labels(target=target, state=candidate).set(1 if candidate == state else 0)
