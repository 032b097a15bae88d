"""The monitor: probes every target on schedule and keeps the judged health.

It connects the edges (the prober, the scheduler) to the pure health model
and publishes what changes: metrics, an INFO log line and an audit record
per transition, so ``hotsite events`` tells why a trunk or a site changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from appliance.clock import Clock
from appliance.logs import kv
from monitoring.callevidence import CallPolicy, FailedCall, SiteCalls, critical, failed_at, fold, lapses_at
from monitoring.health import SiteVerdict, TargetHealth, Thresholds, judge_site, observe, with_calls
from monitoring.metrics import Metrics
from monitoring.prober import Prober
from monitoring.probes import kinds
from monitoring.probes.base import ProbeResult
from monitoring.probes.host import HostProbe
from monitoring.probes.link import LinkMonitor
from monitoring.scheduler import ProbeScheduler
from monitoring.settings import MonitoringConfig as Config
from monitoring.targets import Target, from_config

log = logging.getLogger(f"hotsite.{__name__}")

Recorder = Callable[..., Any]  # Store.record-like: record(kind, subject=…, message=…, data=…)


class Monitor:
    def __init__(self, config: Config, metrics: Metrics, clock: Clock, record: Recorder) -> None:
        # Told of every change of a site's verdict (the failover service listens here).
        self.on_verdict: Callable[[SiteVerdict], None] = lambda verdict: None
        # Told of every published change of a target's state: (target, kind, state, why).
        self.on_target_state: Callable[[str, str, str, str], None] = lambda target, kind, state, why: None
        # Which site serves a hotline under the routing in force (the failover service tells; until
        # then, and with normal routing, the primary). None: nobody can say (routing unknown).
        self.serving_site: Callable[[str], str | None] = self._primary
        self._metrics = metrics
        self._clock = clock
        self._record = record
        self.prober = Prober(
            clock=clock.monotonic,
            on_unmatched=lambda reason: metrics.unmatched_replies.labels(reason=reason).inc(),
            tls_ca_file=config.probes.tls_ca_file,
            max_calls=config.testcalls.max_concurrent,
            host=HostProbe(
                config.appliance.state_dir,
                disk_min_free_pct=config.host.disk_min_free_pct,
                memory_min_available_pct=config.host.memory_min_available_pct,
                max_temperature_c=config.host.max_temperature_c,
                clock=clock.monotonic,
            ),
        )
        self.targets: dict[str, Target] = {}
        self.health: dict[str, TargetHealth] = {}
        self.sites: dict[str, SiteVerdict] = {}
        self.calls: dict[str, SiteCalls] = {}  # per site: its latest run of failed test calls
        self.config = config
        self.scheduler: ProbeScheduler  # built by configure(), once per configuration
        self.configure(config)

    # -- configuration -----------------------------------------------------------

    def configure(self, config: Config) -> None:
        """Adopt a (new) config: keep the health of unchanged targets, forget removed ones."""
        self.config = config
        self._set_thresholds(config)
        new = {t.name: t for t in from_config(config)}
        for name, target in self.targets.items():
            if new.get(name) != target:
                self.health.pop(name, None)
                self._metrics.forget_target(name, target.kind)
        self.targets = new
        for name, target in new.items():
            if name not in self.health:
                self.health[name] = TargetHealth(name, kind=target.kind)
                self._metrics.set_target_state(name, target.kind, "unknown")
        self.sites = {name: self.sites.get(name, SiteVerdict(name)) for name in config.sites}
        self.calls = {name: self.calls.get(name, SiteCalls(name)) for name in config.sites}
        for site in self.sites:
            self._judge(site)
        self.scheduler = self._scheduler(config)

    def _scheduler(self, config: Config) -> ProbeScheduler:
        probes = config.probes
        return ProbeScheduler(
            self.prober.probe,
            self.on_result,
            interval_s=probes.interval_s,
            timeout_s=probes.timeout_s,
            clock=self._clock,
            max_in_flight=probes.max_in_flight,
            on_skipped=lambda t, n: self._metrics.probes_skipped.labels(target=t.name).inc(n),
        )

    def _set_thresholds(self, config: Config) -> None:
        """Built once per configuration: on_result runs for every probe, thousands a second."""
        p = config.probes
        self.thresholds = Thresholds(
            rise=p.rise, fall=p.fall, damping_s=p.damping_s, min_evidence=p.min_evidence
        )
        # The kernel's word on a carrier is definitive, not a sample.
        self._link_thresholds = Thresholds(rise=1, fall=1, damping_s=p.damping_s)
        # A test call is one expensive sample minutes apart: its own rise/fall.
        calls = config.testcalls
        self._call_thresholds = Thresholds(rise=calls.rise, fall=calls.fall, damping_s=p.damping_s)
        self._call_policy = CallPolicy(calls.site_critical_failures, calls.site_critical_window_s)

    def thresholds_for(self, target: Target) -> Thresholds:
        which = kinds.get(target.kind).thresholds
        if which == "calls":
            return self._call_thresholds
        return self._link_thresholds if which == "definitive" else self.thresholds

    async def run(self) -> None:
        """Probe until cancelled (the supervisor owns this task)."""
        polled = [t for t in self.targets.values() if kinds.get(t.kind).polled]
        links = LinkMonitor(
            [t.host for t in self.targets.values() if t.kind == "link"], self.on_result, self._clock.monotonic
        )
        async with asyncio.TaskGroup() as group:
            group.create_task(self.scheduler.run(polled), name="probe scheduler")
            group.create_task(links.run(), name="link monitor")

    async def close(self) -> None:
        await self.prober.close()

    # -- results -------------------------------------------------------------------

    def on_result(self, result: ProbeResult) -> None:
        target = self.targets.get(result.target)
        if target is None:  # a result that raced a reload
            return
        before = self.health[target.name]
        after = observe(before, result, self.thresholds_for(target))
        self.health[target.name] = after
        m = self._metrics
        m.probes.labels(target=target.name).inc()
        if kinds.get(target.kind).reports_code:
            m.last_code.labels(target=target.name).set(result.code or 0)
        if result.ok and result.rtt_s is not None:
            m.probe_rtt.labels(target=target.name).observe(result.rtt_s)
        elif not result.ok:
            m.probe_failures.labels(target=target.name, reason=result.reason).inc()
        if self._call_policy.failures:
            self._calls_at_site(target, result)
        if after.state == before.state:
            return
        m.set_target_state(target.name, target.kind, after.state)
        self.on_target_state(target.name, target.kind, after.state, after.why)
        log.info(
            f"{target.name} is {after.state}",
            extra=kv(target=target.name, state=after.state, was=before.state, why=after.why),
        )
        self._record(
            "probe.state",
            subject=target.name,
            message=f"{target.name} {before.state} -> {after.state}: {after.why}",
            data={"state": after.state, "was": before.state, "code": result.code, "reason": result.reason},
        )
        if target.site:
            self._judge(target.site)

    def _calls_at_site(self, target: Target, result: ProbeResult) -> None:
        """A hotline's test call is evidence for the site serving it; a run of failures may lapse."""
        for site, run in self.calls.items():
            lapse = lapses_at(run, self._call_policy)
            if lapse is not None and result.at > lapse:
                self.calls[site] = SiteCalls(site)
                self._judge(site)
        if target.kind != "testcall" or target.trunk is not None:
            return
        serving = self.serving_site(target.name.removeprefix("testcall:"))
        if serving is None or serving not in self.calls:
            return
        site = serving
        number = target.call.number if target.call else target.name
        call = self.prober.last_calls.get(target.name)
        if call is not None and call.started == result.at:  # this call's own record: who answered, its code
            what = failed_at(site, call.ok, call.reason, call.code, call.answered_by)
        else:
            what = failed_at(site, result.ok, result.reason, result.code, None)
        failed = None if what is None else FailedCall(result.at, number, what)
        self.calls[site] = fold(self.calls[site], failed, self._call_policy)
        self._judge(site)

    def _primary(self, hotline: str) -> str | None:
        """Normal routing: every hotline is the primary's."""
        return next((n for n, s in self.config.sites.items() if s.role == "primary"), None)

    def _judge(self, site: str) -> None:
        before = self.sites[site]
        members = [h for name, h in self.health.items() if self.targets[name].site == site]
        critical_targets = frozenset(n for n, t in self.targets.items() if t.site == site and t.critical)
        now = self._clock.monotonic()
        calls = critical(self.calls[site], self._call_policy, now) if site in self.calls else None
        after = judge_site(
            before, members, self.thresholds, now, critical_targets, wall_now=self._clock.time(), calls=calls
        )
        self.sites[site] = after
        self._metrics.set_site_verdict(site, after.verdict)
        if (after.verdict, after.grey) != (before.verdict, before.grey):
            log.info(
                f"site {site} is {after.verdict}",
                extra=kv(site=site, verdict=after.verdict, was=before.verdict, why="; ".join(after.why)),
            )
            self.on_verdict(after)
            self._record(
                "site.verdict",
                subject=site,
                message=f"site {site} {before.verdict} -> {after.verdict}: {'; '.join(after.why)}",
                data={
                    "verdict": after.verdict,
                    "was": before.verdict,
                    "down": list(after.down),
                    "grey": after.grey,
                },
            )

    # -- views -----------------------------------------------------------------------

    def target_view(self, name: str) -> dict[str, Any]:
        target = self.targets[name]
        h = self.health.get(name) or TargetHealth(name, kind=target.kind)
        last = h.last
        now = self._clock.monotonic()
        interval, timeout = self.scheduler.timing(target)
        state: str = h.state
        why = h.why
        if target.trunk and target.kind != "testcall":  # a trunk whose calls fail is degraded
            state, why = with_calls(h, self.health.get(f"testcall:{name}"))
        view: dict[str, Any] = {
            "target": name,
            "kind": target.kind,
            "address": target.url or (f"{target.host}:{target.port}" if target.port else target.host),
            "transport": target.transport or None,
            "state": state,
            "since_s": None if h.since is None else round(now - h.since, 3),
            "why": why,
            "reason": h.reason,
            "pending": h.pending,
            "rtt_ms": None if last is None or last.rtt_s is None else round(last.rtt_s * 1000, 3),
            "last_code": None if last is None else last.code,
            "last_result": None if last is None else last.reason,
            "interval_s": interval,
            "timeout_s": timeout,
        }
        call = self.prober.last_calls.get(name)
        if call is not None:
            view["last_call"] = call.to_json()
        return view

    def site_view(self, site: str) -> dict[str, Any]:
        verdict = self.sites[site]
        now = self._clock.monotonic()
        return {
            "verdict": verdict.verdict,
            "verdict_since_s": None if verdict.since is None else round(now - verdict.since, 3),
            "why": list(verdict.why),
            "targets": [self.target_view(n) for n, t in self.targets.items() if t.site == site],
        }

    def summary(self) -> str:
        up = sum(1 for h in self.health.values() if h.state == "up")
        return f"{up}/{len(self.health)} targets up"
