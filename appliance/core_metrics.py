"""The core's metrics: the daemon process itself, its build, reloads and its listeners.

Base layer, beside :mod:`appliance.core_settings`: what every hotsite daemon
exposes whatever features it runs. Each feature owns its own metrics module
(:mod:`monitoring.metrics`, :mod:`failover.metrics`, :mod:`appliance.paging.metrics`,
:mod:`appliance.replication.metrics`, ...); the top's feature table
(:mod:`appliance.features`) lists them all for the catalogue.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, ProcessCollector

from appliance import __version__


class CoreMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # process_* (CPU seconds, resident memory, open fds, start time) of the daemon itself, on its own
        # registry: the stock collector, so dashboards and alerts written for any exporter work here too.
        ProcessCollector(registry=registry)
        self.build_info = Info("hotsite_build", "Version of the running hotsite.", registry=registry)
        self.build_info.info({"version": __version__, "python": platform.python_version()})
        self.start_time = Gauge(
            "hotsite_start_time_seconds", "Unix time the daemon started.", registry=registry
        )
        self.config_reloads = Counter(
            "hotsite_config_reloads_total",
            "Configuration reloads by result.",
            ["result"],
            registry=registry,
        )
        self.http_requests = Counter(
            "hotsite_http_requests_total",
            "Requests to the daemon's HTTP listeners (metrics, alertmanager) by outcome; refused ones too.",
            ["listener", "outcome"],
            registry=registry,
        )
        self.api_bad_requests = Counter(
            "hotsite_api_bad_requests_total",
            "Control API requests rejected before reaching a handler.",
            ["reason"],
            registry=registry,
        )
