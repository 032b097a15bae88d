"""The monitoring feature's control API methods: ``probes`` and ``trunks``.

A trunk's view puts together what three monitoring parts know of it: the
monitor (its OPTIONS state), the calls-in-progress reader and the KPI reader
(whose failing calls make a trunk that answers OPTIONS ``degraded``). The top
builds these parts, rebuilds them on a reload and has none while starting, so
it hands in accessors; the routes are listed with every other feature's in
``appliance/features.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from appliance.api import Caller, Handler, RequestError
from monitoring.calls_in_progress import UsageMonitor
from monitoring.kpi_monitor import KpiMonitor
from monitoring.kpis import CallsHealth, trunk_state
from monitoring.monitor import Monitor


@dataclass(frozen=True)
class MonitoringParts:
    """Accessors for the parts as they are now (None: not built, or turned off in the config)."""

    monitor: Callable[[], Monitor | None]
    calls: Callable[[], UsageMonitor | None]
    kpis: Callable[[], KpiMonitor | None]
    trunks: Callable[[], Mapping[str, Any]]  # the config's [trunks] table


def trunk_views(parts: MonitoringParts) -> list[dict[str, Any]]:
    """Every configured trunk: its probe's view, calls in progress, KPIs and the state they make."""
    monitor = _monitor(parts)
    usage, kpis = parts.calls(), parts.kpis()
    calls = usage.trunks if usage else {}
    views = []
    for name, trunk in parts.trunks().items():
        view = {"name": name, "carrier": trunk.carrier, **monitor.target_view(f"trunk:{name}")}
        view["calls_in_progress"] = calls.get(name)
        if kpis is not None:
            view["kpis"] = kpis.view(name, calls.get(name))
            health = kpis.health.get(name, CallsHealth())
            view["state"], view["why"] = trunk_state(view["state"], view["why"], health)
        views.append(view)
    return views


def handlers(parts: MonitoringParts) -> dict[str, Handler]:
    """The routes this feature answers (the feature table declares the same names)."""

    async def probes(caller: Caller, params: dict[str, Any]) -> Any:
        monitor = _monitor(parts)
        return [monitor.target_view(name) for name in monitor.targets]

    async def trunks(caller: Caller, params: dict[str, Any]) -> Any:
        return trunk_views(parts)

    return {"probes": probes, "trunks": trunks}


def _monitor(parts: MonitoringParts) -> Monitor:
    monitor = parts.monitor()
    if monitor is None:
        raise RequestError("monitoring is starting; try again")
    return monitor
