"""Monitoring's Prometheus metrics: probes, targets, sites, calls in progress.

Each feature owns its metrics module (the core's in :mod:`appliance.core_metrics`,
failover's in :mod:`failover.metrics`, paging's and replication's in theirs); the
feature table at the top (:mod:`appliance.features`) lists them all, and the
catalogue (``monitoring/METRICS.md``) is built from it.

The registry is passed in (a fresh one per test, as prometheus/client_python
itself recommends) rather than using the global default. Label values are
bounded: target names come from the config, reasons from a fixed vocabulary.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from monitoring.probes.base import REASONS

TARGET_STATES = ("unknown", "up", "down")
SITE_VERDICTS = ("unknown", "up", "degraded", "down")
# Sized for SIP OPTIONS over a WAN: sub-millisecond in a rack, hundreds of ms on a bad trunk.
RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.probe_up = Gauge(
            "hotsite_probe_up",
            "1 when the target's judged state is up, 0 otherwise.",
            ["target", "kind"],
            registry=registry,
        )
        self.probe_state = Gauge(
            "hotsite_probe_state",
            "Judged state of the target (one series per state, 1 for the current one).",
            ["target", "state"],
            registry=registry,
        )
        self.probe_rtt = Histogram(
            "hotsite_probe_rtt_seconds",
            "Round-trip time of successful probes.",
            ["target"],
            buckets=RTT_BUCKETS,
            registry=registry,
        )
        self.probe_failures = Counter(
            "hotsite_probe_failures_total",
            "Failed probes by reason (timeout, unreachable, bad_code, send_error).",
            ["target", "reason"],
            registry=registry,
        )
        self.probes = Counter("hotsite_probes_total", "Probes run.", ["target"], registry=registry)
        self.unmatched_replies = Counter(
            "hotsite_sip_unmatched_replies_total",
            "SIP replies ignored because they matched no outstanding probe (stray, spoofed, late, garbage).",
            ["reason"],
            registry=registry,
        )
        self.site_verdict = Gauge(
            "hotsite_site_verdict",
            "Verdict on each site from all its vantage points (one series per verdict, 1 for the current).",
            ["site", "verdict"],
            registry=registry,
        )
        self.site_up = Gauge(
            "hotsite_site_up",
            "1 when the site's verdict is up, 0 otherwise (degraded, down or unknown).",
            ["site"],
            registry=registry,
        )
        self.probes_skipped = Counter(
            "hotsite_probe_slots_skipped_total",
            "Probe slots skipped because the previous probe of the target overran its interval.",
            ["target"],
            registry=registry,
        )
        self.kamailio_rpc_up = Gauge(
            "hotsite_kamailio_rpc_up", "1 when Kamailio's JSON-RPC answered the last poll.", registry=registry
        )
        self.site_calls = Gauge(
            "hotsite_site_calls_in_progress",
            "Calls in progress routed to each site (Kamailio dialog profile calls_by_set).",
            ["site"],
            registry=registry,
        )
        self.trunk_calls = Gauge(
            "hotsite_trunk_calls_in_progress",
            "Calls in progress from each carrier trunk (Kamailio dialog profile calls_by_trunk).",
            ["trunk"],
            registry=registry,
        )
        self.last_code = Gauge(
            "hotsite_probe_last_status_code",
            "SIP status code of the last reply (0 when none).",
            ["target"],
            registry=registry,
        )

    def set_target_state(self, target: str, kind: str, state: str) -> None:
        self.probe_up.labels(target=target, kind=kind).set(1 if state == "up" else 0)
        for candidate in TARGET_STATES:
            self.probe_state.labels(target=target, state=candidate).set(1 if candidate == state else 0)

    def set_site_verdict(self, site: str, verdict: str) -> None:
        self.site_up.labels(site=site).set(1 if verdict == "up" else 0)
        for candidate in SITE_VERDICTS:
            self.site_verdict.labels(site=site, verdict=candidate).set(1 if candidate == verdict else 0)

    def forget_target(self, target: str, kind: str) -> None:
        """Drop a target's series after a reload removed it from the config."""
        for metric, labels in (
            (self.probe_up, (target, kind)),
            (self.probe_rtt, (target,)),
            (self.probes, (target,)),
            (self.probes_skipped, (target,)),
            (self.last_code, (target,)),
        ):
            _remove(metric, labels)
        for state in TARGET_STATES:
            _remove(self.probe_state, (target, state))
        for reason in REASONS:
            _remove(self.probe_failures, (target, reason))


def _remove(metric: Any, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


def serve(registry: CollectorRegistry, host: str, port: int, **options: Any) -> Any:
    """Start the bounded /metrics server in its own thread; return it (call ``shutdown``).

    ``options``: ``tls_cert_file``, ``tls_key_file``, ``basic_auth_users`` (see
    :mod:`monitoring.exposition`).
    """
    from monitoring.exposition import serve as serve_bounded

    return serve_bounded(registry, host, port, **options)
