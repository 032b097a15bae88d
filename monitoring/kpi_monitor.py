"""The I/O edge of the call KPIs: reads Kamailio's statistics, keeps the windows, exports metrics.

One ``stats.get_statistics script:`` call per ``[callkpis] interval_s`` (all
trunks in one answer); the arithmetic and the judgement are the pure
functions of :mod:`monitoring.kpis`. When Kamailio cannot be read, the
windows are kept (a counter that resets is detected on the next reading) but
nothing is judged from a stale view: the last judgement stands and the error
is shown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from appliance.clock import Clock
from appliance.fields import host_port
from appliance.kamailio import KamailioRpc, KamailioRpcError
from appliance.logs import kv
from monitoring import kpis
from monitoring.kpis import AsrPolicy, CallsHealth, Counters, KpiParseError, Window
from monitoring.settings import MonitoringConfig as Config

log = logging.getLogger(f"hotsite.{__name__}")

# (trunk, before, after): told of every change of a trunk's calls judgement.
OnChange = Callable[[str, CallsHealth, CallsHealth], None]


class KpiMonitor:
    def __init__(
        self, config: Config, rpc: KamailioRpc, clock: Clock, on_change: OnChange | None = None
    ) -> None:
        section = config.callkpis
        self._config = config
        self._rpc = rpc
        self._clock = clock
        self._on_change = on_change or (lambda trunk, before, after: None)
        self.window_s = section.window_s
        self.policy = AsrPolicy(section.min_asr_pct, section.recover_asr_pct, section.min_attempts)
        self.addresses = {name: host_port(t.address)[0] for name, t in config.trunks.items()}
        self.windows: dict[str, Window] = {name: Window(section.window_s) for name in self.addresses}
        self.totals: dict[str, Counters] = {}
        self.health: dict[str, CallsHealth] = {name: CallsHealth() for name in self.addresses}
        self.uncounted: list[str] = []  # trunks the Kamailio config does not count
        self.error: str | None = None

    def adopt(self, old: KpiMonitor) -> None:
        """Keep the windows and judgements of trunks whose address a reload did not change.

        Without this, a reload would forget a trunk judged failing, and its incident
        would never be resolved by a later recovery.
        """
        for name, ip in self.addresses.items():
            if old.addresses.get(name) == ip:
                self.windows[name].readings = old.windows[name].readings
                self.health[name] = old.health[name]
                if name in old.totals:
                    self.totals[name] = old.totals[name]

    async def run(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self._config.callkpis.interval_s)

    async def poll(self) -> None:
        try:
            values = kpis.parse_statistics(await self._rpc.call("stats.get_statistics", f"{kpis.GROUP}:"))
        except (KamailioRpcError, KpiParseError) as exc:
            message = exc.message if isinstance(exc, KamailioRpcError) else str(exc)
            if self.error is None:
                log.warning("cannot read call KPIs from Kamailio", extra=kv(error=message))
            self.error = message
            return
        if self.error is not None:
            log.info("reading call KPIs from Kamailio again")
        self.error = None
        self.fold(values, self._clock.monotonic())

    def fold(self, values: dict[str, int], now: float) -> None:
        """One reading of every trunk's counters: windows, totals, judgements."""
        uncounted = []
        for name, ip in self.addresses.items():
            counters = kpis.counters_for(ip, values)
            if counters is None:
                uncounted.append(name)
                continue
            window = self.windows[name]
            window.add(now, counters)
            self.totals[name] = counters
            before = self.health[name]
            after = kpis.judge_calls(before, window.traffic(), self.window_s, self.policy, now)
            self.health[name] = after
            if after.state != before.state:
                log.info(
                    f"trunk {name} calls {after.state}",
                    extra=kv(trunk=name, calls=after.state, was=before.state, why=after.why),
                )
                self._on_change(name, before, after)
        if uncounted != self.uncounted and uncounted:
            log.warning(
                "Kamailio does not count calls of these trunks (not in its generated config)",
                extra=kv(trunks=",".join(uncounted)),
            )
        self.uncounted = uncounted

    def view(self, trunk: str, calls_in_progress: int | None = None) -> dict[str, Any]:
        """The trunk's KPIs over the window, its totals, and its calls against its channels."""
        channels = self._config.callkpis.channels.get(trunk)
        window = self.windows.get(trunk)
        health = self.health.get(trunk, CallsHealth())
        out: dict[str, Any] = {
            "calls": health.state,
            "calls_why": health.why,
            "channels": channels,
            "channels_used_pct": (
                None
                if channels is None or calls_in_progress is None
                else round(100 * calls_in_progress / channels, 1)
            ),
            "error": self.error,
            "counted": trunk not in self.uncounted,
        }
        if window is not None and trunk in self.totals:
            out |= kpis.view(window.traffic(), self.window_s, window.span_s)
            total = self.totals[trunk]
            out["total"] = {"attempts": total.attempts, "answered": total.answered, "failed": total.failed}
        return out


class CallKpiMetrics(Collector):
    """The KPIs on /metrics: Kamailio's totals as counters, the window's ratios as gauges."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.source: KpiMonitor | None = None
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        kpi = self.source
        totals = kpi.totals if kpi is not None and kpi.error is None else {}
        fams = _families()
        for trunk, c in sorted(totals.items()):
            fams["attempts"].add_metric([trunk], c.attempts)
            fams["answered"].add_metric([trunk], c.answered)
            fams["pdd_sum"].add_metric([trunk], c.pdd_ms / 1000)
            fams["pdd_count"].add_metric([trunk], c.pdd_calls)
            for klass, n in sorted(c.classes.items()):
                fams["failures"].add_metric([trunk, klass], n)
            for code, n in sorted(c.codes.items()):
                fams["codes"].add_metric([trunk, str(code)], n)
            traffic = kpi.windows[trunk].traffic() if kpi is not None else Counters()
            for key, value in (("asr", traffic.asr), ("ner", traffic.ner)):
                if value is not None:
                    fams[key].add_metric([trunk], value)
            health = kpi.health[trunk] if kpi is not None else CallsHealth()
            fams["failing"].add_metric([trunk], 1 if health.state == "failing" else 0)
        for trunk, n in sorted((kpi._config.callkpis.channels if kpi is not None else {}).items()):  # noqa: SLF001
            fams["channels"].add_metric([trunk], n)
        yield from fams.values()


def _families() -> dict[str, CounterMetricFamily | GaugeMetricFamily]:
    t = ["trunk"]
    counted = "counted by Kamailio (statistics module), from each trunk's source address"
    return {
        "attempts": CounterMetricFamily(
            "hotsite_trunk_call_attempts", f"Initial INVITEs from each carrier trunk, {counted}.", labels=t
        ),
        "answered": CounterMetricFamily(
            "hotsite_trunk_calls_answered",
            f"Calls from each trunk answered (2xx relayed), {counted}.",
            labels=t,
        ),
        "failures": CounterMetricFamily(
            "hotsite_trunk_call_failures",
            f"Calls from each trunk that ended in a final failure, by class (3xx-6xx), {counted}.",
            labels=["trunk", "class"],
        ),
        "codes": CounterMetricFamily(
            "hotsite_trunk_call_failure_codes",
            "Final failures by SIP code, for the usual codes (monitoring/kpis.py CODES);"
            " others are counted only by class.",
            labels=["trunk", "code"],
        ),
        "pdd_sum": CounterMetricFamily(
            "hotsite_trunk_post_dial_delay_seconds",
            "Sum of post-dial delays (INVITE in -> first 18x or 2xx relayed) of each trunk's calls;"
            " divide by hotsite_trunk_post_dial_delay_calls_total for the average.",
            labels=t,
        ),
        "pdd_count": CounterMetricFamily(
            "hotsite_trunk_post_dial_delay_calls",
            "Calls of each trunk that rang or answered (PDD taken).",
            labels=t,
        ),
        "asr": GaugeMetricFamily(
            "hotsite_trunk_asr_ratio", "Answer-seizure ratio over [callkpis] window_s (0-1).", labels=t
        ),
        "ner": GaugeMetricFamily(
            "hotsite_trunk_ner_ratio",
            "Network effectiveness ratio over [callkpis] window_s: answered or ended by the user (0-1).",
            labels=t,
        ),
        "failing": GaugeMetricFamily(
            "hotsite_trunk_calls_failing",
            "1 when a trunk's ASR is below [callkpis] min_asr_pct over enough attempts.",
            labels=t,
        ),
        "channels": GaugeMetricFamily(
            "hotsite_trunk_channels", "Each trunk's configured channels ([callkpis] channels).", labels=t
        ),
    }
