"""The appliance: wires config, state store, probes, health model, metrics and the API.

This module only connects parts; decisions live in the pure modules
(``monitoring.health``), I/O in the edges (probes, store, API).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from prometheus_client import CollectorRegistry

from appliance import __version__, features, migrations, roles
from appliance import config as config_mod
from appliance.api import ApiServer, Caller, RequestError
from appliance.clock import Clock, SystemClock
from appliance.config import Config
from appliance.core_metrics import CoreMetrics
from appliance.daemon import Daemon
from appliance.errors import ConfigError
from appliance.kamailio import KamailioRpc
from appliance.logs import kv
from appliance.paging.service import PagingService
from appliance.replication.metrics import ReplicationMetrics
from appliance.replication.service import ReplicationService
from appliance.store import Store
from appliance.systemd import Notifier
from failover import verification
from failover.actuators.factory import build_actuators
from failover.actuators.replication import ReplicationActuator
from failover.coordination.backends import from_config as coordination_from_config
from failover.coordination.base import Coordination
from failover.coordination.witness import WitnessOnly
from failover.drill import Drill
from failover.engine import Page, Resolve
from failover.metrics import FailoverMetrics
from failover.service import FailoverService
from failover.witness import voter_from_config
from monitoring import handlers as monitoring_api
from monitoring import metrics as metrics_mod
from monitoring.calls_in_progress import UsageMonitor
from monitoring.kpi_monitor import CallKpiMetrics, KpiMonitor
from monitoring.kpis import CallsHealth
from monitoring.monitor import Monitor
from monitoring.probes.host import HostCollector
from monitoring.targets import from_config

log = logging.getLogger(f"hotsite.{__name__}")

# Settings that only take effect at start; a reload that changes them says so.
RESTART_ONLY = (
    "appliance.state_dir",
    "appliance.runtime_dir",
    "metrics.listen",
    "metrics.enabled",
    "replication",
    "actuators",
    "failover.witness",
    "coordination",
    "paging",
    "channels",
    "contacts",
)


class Appliance(Daemon):
    def __init__(
        self,
        config: Config,
        config_path: Path,
        *,
        registry: CollectorRegistry | None = None,
        clock: Clock | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        super().__init__(notifier)
        self.config = config
        self.config_path = config_path
        self.clock = clock or SystemClock()
        # Each feature's metrics on the one registry; the catalogue lists the same classes from the
        # feature table (appliance/features.py), and a unit test compares the two.
        registry = registry or CollectorRegistry()
        self.core_metrics = CoreMetrics(registry)
        self.metrics = metrics_mod.Metrics(registry)  # monitoring's
        self.failover_metrics = FailoverMetrics(registry)
        self.store: Store | None = None
        self.api: ApiServer | None = None
        self._metrics_server: Any = None
        self._host_collector: HostCollector | None = None
        self.monitor: Monitor | None = None
        self.failover: FailoverService | None = None
        self.replication: ReplicationService | None = None
        self.paging: PagingService | None = None
        self.coordination: Coordination = WitnessOnly()  # replaced by the configured backend at start
        self.kamailio: KamailioRpc | None = None
        self.usage: UsageMonitor | None = None
        self.kpis: KpiMonitor | None = None  # per-trunk call KPIs (monitoring/KPIS.md)
        self.kpi_metrics = CallKpiMetrics(self.metrics.registry)
        self._kpis_before: KpiMonitor | None = None
        self._started_at = 0.0
        self._started = False

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self._started_at = self.clock.time()
        self.store = Store.open_or_in_memory(
            cfg.appliance.state_dir, clock=self.clock.time, components=migrations.COMPONENTS
        )
        self.api = ApiServer(
            cfg.appliance.runtime_dir,
            self._handlers(),
            group=cfg.appliance.socket_group,
            on_bad_request=lambda reason: self.core_metrics.api_bad_requests.labels(reason=reason).inc(),
            authorize=roles.policy_from(cfg.appliance).refusal,
        )
        await self.api.start()
        if cfg.metrics.enabled:
            host, port = config_mod.host_port(cfg.metrics.listen)
            options = cfg.metrics.server_options()
            requests = self.core_metrics.http_requests
            options["on_outcome"] = lambda outcome: requests.labels("metrics", outcome).inc()
            self._metrics_server = metrics_mod.serve(self.metrics.registry, host, port, **options)
        self.core_metrics.start_time.set(self._started_at)
        self._host_collector = HostCollector(cfg.appliance.state_dir, cfg.host.interfaces)
        self._host_collector.cpu.start()  # sampled on the daemon's own interval, not per scrape
        self.metrics.registry.register(self._host_collector)
        for problem in config_mod.check_environment(cfg):
            log.error("configuration problem", extra=kv(problem=problem))
        targets = from_config(cfg)
        self.store.record(
            "daemon.start",
            message=f"hotsite {__version__} started",
            data={"pid": os.getpid(), "config": str(self.config_path), "targets": len(targets)},
        )
        self.monitor = Monitor(cfg, self.metrics, self.clock, self._record)
        self.replication = ReplicationService(
            cfg.replication,
            store=self.store,
            metrics=ReplicationMetrics(self.metrics.registry),
            clock=self.clock,
        )
        await self.replication.start()
        self.paging = PagingService(
            cfg, self.store, self.metrics.registry, clock=self.clock, status_text=self.sms_status
        )
        counted = self.core_metrics.http_requests
        self.paging.on_receiver_outcome = lambda outcome: counted.labels("alertmanager", outcome).inc()
        await self.paging.start()
        self.monitor.on_target_state = self._target_incident
        self._start_usage(cfg)
        self._start_failover(cfg)
        self.supervisor.start("probes", self.monitor.run)
        self.supervisor.start("conditions", self._watch_conditions)
        self._started = True
        log.info(
            "hotsite started",
            extra=kv(version=__version__, config=self.config_path, targets=len(targets)),
        )

    def _start_failover(self, cfg: Config) -> None:
        """The engine, its actuators in runbook order (routing first, the data last), the witness."""
        assert self.store is not None and self.monitor is not None and self.replication is not None
        actuators = build_actuators(cfg)
        if self.replication.sqlite_streams():
            actuators.append(ReplicationActuator(self.replication))
        # Who may act: this appliance alone, or the holder of a shared lease whose every
        # actuator call carries the lease's fencing token (failover/coordination/).
        self.coordination = coordination_from_config(
            cfg,
            registry=self.metrics.registry,
            record=lambda kind, message, data: self._record(kind, message=message, data=data),
        )
        voter = self.coordination.voter(voter_from_config(cfg, clock=self.clock), self._site_verdicts)
        actuators = self.coordination.guard(actuators, on_takeover=self._took_over)
        self.coordination.on_change(self._coordination_changed)
        for name, job in self.coordination.jobs().items():
            self.supervisor.start(name, job)
        self.failover = FailoverService(
            cfg,
            self.store,
            self.clock,
            actuators,
            voter,
            pager=self._page,
            drill=Drill(
                cfg,
                site_verdict=lambda site: self.monitor.sites[site].verdict if self.monitor else "unknown",
                replication_lagging=self.replication.readiness,
                actuators=actuators,
                voter=voter,
                kamailio=lambda: self.kamailio,
            ),
            verify_calls=verification.caller(lambda: self.config) if verification.enabled(cfg) else None,
            on_change=self._show_failover_state,
            epoch_is_token=self.coordination.epoch_is_token,
        )
        self.monitor.on_verdict = self.failover.on_site_verdict
        self.monitor.serving_site = self.failover.serving_site  # test calls judge the site serving them
        for name, job in (
            ("failover", self.failover.run),
            ("failover ticks", functools.partial(self.failover.ticks, cfg.failover.tick_s)),
            ("witness", functools.partial(self.failover.poll_witness, cfg.failover.witness_poll_s)),
            ("reconcile", self.failover.reconcile),
        ):
            self.supervisor.start(name, job)
        self._show_failover_state(self.failover.state)

    def _show_failover_state(self, state: Any) -> None:
        """The engine's state on /metrics."""
        self.failover_metrics.show(state.state, state.routing, state.epoch)

    def _site_verdicts(self) -> dict[str, str]:
        return {name: site.verdict for name, site in self.monitor.sites.items()} if self.monitor else {}

    async def _took_over(self, observed: str, token: int) -> int:
        """A new leader's engine follows the routing it read back (the engine decides)."""
        assert self.failover is not None
        return await self.failover.took_over(observed, token)

    def _coordination_changed(self, role: str, detail: str) -> None:
        """Losing sight of etcd (or the lease) is worth a page: nobody acts until it is back."""
        action: Page | Resolve
        if role == "unknown":
            action = Page("coordination", "critical", f"etcd coordination lost: {detail}")
        else:
            action = Resolve("coordination", f"etcd coordination: {role}")
        self.supervisor.spawn("coordination page", self._page(action))

    async def _page(self, action: Page | Resolve) -> None:
        """The engine's pages become incidents (deduplicated by key, resolved when cleared)."""
        assert self.paging is not None
        if isinstance(action, Page):
            await self.paging.raise_incident(
                f"failover:{action.key}",
                action.summary,
                severity=action.severity,
                group="failover",
                source="engine",
            )
        else:
            await self.paging.clear(f"failover:{action.key}")

    def _target_incident(self, target: str, kind: str, state: str, why: str) -> None:
        """A trunk, an SBC or the appliance itself going down is an incident; up again clears it."""
        if self.paging is None or kind == "link" and state == "unknown":
            return
        key = f"target:{target}"
        if state == "down":
            severity: Literal["error", "critical"] = (
                "critical" if target.startswith(("site:", "host:disk")) else "error"
            )
            job = self.paging.raise_incident(
                key,
                f"{target} is down: {why}",
                severity=severity,
                group=target.split(":")[0],
                source="health",
            )
        elif state == "up":
            job = self.paging.clear(key)
        else:
            return
        self.supervisor.spawn(f"incident {key}", job)

    def _close_removed(self, targets: set[str]) -> None:
        """A target removed by a reload is never probed again: its open incident would never clear."""
        if self.paging is None:
            return
        for target in sorted(targets):
            job = self.paging.clear(f"target:{target}", reason=f"{target} removed from the configuration")
            self.supervisor.spawn(f"incident target:{target}", job)

    async def _watch_conditions(self, interval_s: float = 5.0) -> None:
        """Conditions that are not probe targets become incidents too: replica lag, modem trouble."""
        raised: set[str] = set()
        while True:
            await asyncio.sleep(interval_s)
            assert self.paging is not None and self.replication is not None
            now: dict[str, str] = {}
            for problem in self.replication.readiness():
                stream = problem.split(":", 1)[0].removeprefix("replication stream ")
                now[f"replication:{stream}"] = problem
            if self.store is not None and self.store.in_memory:
                now["state:disk"] = (
                    f"state disk full ({self.config.appliance.state_dir}): running from memory,"
                    " nothing recorded durably; free space and restart hotsite"
                )
            for channel in self.paging.channels.values():
                health = channel.health()
                if health.get("up") is False:
                    name, why = health["name"], health.get("error") or "no detail"
                    now[f"channel:{name}"] = f"paging channel {name} ({health['kind']}) is down: {why}"
            for key in sorted(set(now) - raised):
                await self.paging.raise_incident(
                    key, now[key], severity="error", group=key.split(":")[0], source="appliance"
                )
            for key in sorted(raised - set(now)):
                await self.paging.clear(key)
            raised = set(now)

    def sms_status(self) -> str:
        """The short answer to a contractor's STATUS text: works when nothing else does."""
        if self.monitor is None or self.failover is None:
            return f"hotsite {self.config.appliance.name}: starting"
        sites = " ".join(f"{n}={v.verdict}" for n, v in self.monitor.sites.items())
        trunks = [h for n, h in self.monitor.health.items() if n.startswith("trunk:")]
        up = sum(1 for h in trunks if h.state == "up")
        f = self.failover.state
        return (
            f"hotsite {self.config.appliance.name}: {sites}; trunks up {up}/{len(trunks)};"
            f" failover {f.state} (routing {f.routing})"
        )

    def _start_usage(self, cfg: Config) -> None:
        """Calls in progress, when the carrier edge's Kamailio RPC is configured."""
        if cfg.kamailio.rpc_url:
            self.kamailio = KamailioRpc(cfg.kamailio.rpc_url, timeout_s=cfg.kamailio.rpc_timeout_s)
            self.usage = UsageMonitor(cfg, self.kamailio, self.metrics)
            self.supervisor.start("usage", self.usage.run)
            if cfg.callkpis.enabled and cfg.trunks:
                self.kpis = KpiMonitor(cfg, self.kamailio, self.clock, self._calls_changed)
                if self._kpis_before is not None:  # a reload: carry the windows over
                    self.kpis.adopt(self._kpis_before)
                self.kpi_metrics.source = self.kpis
                self.supervisor.start("call kpis", self.kpis.run)

    async def _stop_usage(self) -> None:
        await self.supervisor.stop("usage")
        await self.supervisor.stop("call kpis")
        self._kpis_before, self.kpis = self.kpis, None
        self.kpi_metrics.source = None
        if self.kamailio is not None:
            await self.kamailio.close()
        self.kamailio, self.usage = None, None

    async def reload(self) -> None:
        """SIGHUP: apply the new config, or keep the old one on *any* failure; never stop the daemon."""
        old = self.config
        try:
            new = config_mod.load(self.config_path)
            await self._apply(new)
        except Exception as exc:
            error = exc if isinstance(exc, ConfigError) else ConfigError(f"{type(exc).__name__}: {exc}")
            self.core_metrics.config_reloads.labels(result="rejected").inc()
            for problem in error.problems or [error.message]:
                log.error("new configuration rejected; keeping the old one", extra=kv(problem=problem))
            self._record("config.reload_rejected", message=error.message, data={"problems": error.problems})
            if self.config is not old:
                await self._apply(old)  # half-applied: back to what ran before
            return
        self.core_metrics.config_reloads.labels(result="applied").inc()

    async def _apply(self, new: Config) -> None:
        ignored = [key for key in RESTART_ONLY if _get(new, key) != _get(self.config, key)]
        for key in ignored:
            log.warning("setting changes only at restart", extra=kv(key=key))
        self.config = new
        assert self.monitor is not None
        await self.supervisor.stop("probes")
        before = set(self.monitor.targets)
        self.monitor.configure(new)
        self._close_removed(before - set(self.monitor.targets))
        if self.failover is not None:
            self.failover.config = new
        self.supervisor.start("probes", self.monitor.run)
        await self._stop_usage()
        self._start_usage(new)
        self._record("config.reload", message="configuration reloaded", data={"restart_needed_for": ignored})
        log.info("configuration reloaded", extra=kv(targets=len(self.monitor.targets)))

    async def stop(self) -> None:
        if self.monitor is not None:
            await self.monitor.close()
        if self.failover is not None:
            await self.failover.close()
        if self.replication is not None:
            await self.replication.stop()
        if self.paging is not None:
            await self.paging.stop()
        await self._stop_usage()
        if self.api is not None:
            await self.api.close()
        if self._host_collector is not None:
            self._host_collector.cpu.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self.store is not None:
            if self._started:
                self.store.record("daemon.stop", message="hotsite stopped")
            self.store.close()
            self.store = None
        if self._started:
            log.info("hotsite stopped")

    def describe(self) -> str:
        return self.monitor.summary() if self.monitor else "starting"

    def _record(self, kind: str, **fields: Any) -> None:
        if self.store is not None:
            self.store.record(kind, **fields)

    # -- control API -----------------------------------------------------------

    def _handlers(self) -> dict[str, Any]:
        """The control API's routes: each feature's handlers, checked against the feature table
        (a route no feature declares, or two features claim, stops the start with both named)."""
        return features.route_table(
            {
                "core": {
                    "ping": self._api_ping,
                    "status": self._api_status,
                    "events": self._api_events,
                    "note": self._api_note,
                    "reload": self._api_reload,
                },
                "monitoring": monitoring_api.handlers(self._monitoring_parts),
                # The coordination backend is chosen here at the top; the engine's commands are
                # the failover service's own handlers().
                "failover": {"coordination.status": self._api_coordination}
                | self._delegated("failover", lambda: self.failover, but=("coordination.status",)),
                "paging": self._delegated("paging", lambda: self.paging),
                "replication": self._delegated("replication", lambda: self.replication),
            }
        )

    @staticmethod
    def _delegated(feature: str, service: Callable[[], Any], but: tuple[str, ...] = ()) -> dict[str, Any]:
        """A feature service's ``handlers()``, for the routes the feature table gives it, delegated
        once the service exists (the socket opens before the services start)."""

        def delegate(name: str) -> Any:
            async def handler(caller: Caller, params: dict[str, Any]) -> Any:
                running = service()
                if running is None:
                    raise RequestError(f"{feature} is starting; try again")
                return await running.handlers()[name](caller, params)

            return handler

        return {name: delegate(name) for name in features.routes_of(feature) if name not in but}

    async def _api_coordination(self, caller: Caller, params: dict[str, Any]) -> Any:
        return self.coordination.view()

    async def _api_ping(self, caller: Caller, params: dict[str, Any]) -> Any:
        return {"pong": True, "version": __version__, "pid": os.getpid()}

    async def _api_status(self, caller: Caller, params: dict[str, Any]) -> Any:
        return self.status(events=_int_param(params, "events", 10, 0, 1000))

    @functools.cached_property
    def _monitoring_parts(self) -> monitoring_api.MonitoringParts:
        return monitoring_api.MonitoringParts(
            monitor=lambda: self.monitor,
            calls=lambda: self.usage,
            kpis=lambda: self.kpis,
            trunks=lambda: self.config.trunks,
        )

    def _calls_changed(self, trunk: str, before: CallsHealth, after: CallsHealth) -> None:
        """A trunk's real calls failing (ASR over the window) is an incident; recovered clears it."""
        self._record(
            "trunk.calls",
            subject=f"trunk:{trunk}",
            message=f"trunk {trunk} calls {before.state} -> {after.state}: {after.why}",
            data={"state": after.state, "was": before.state},
        )
        if self.paging is None or not self.config.callkpis.page:
            return
        key = f"calls:{trunk}"
        if after.state == "failing":
            job = self.paging.raise_incident(
                key, f"trunk {trunk} is degraded: calls failing: {after.why}", group="trunk", source="kpis"
            )
        elif before.state == "failing":
            job = self.paging.clear(key, source="kpis")
        else:
            return
        self.supervisor.spawn(f"incident {key}", job)

    async def _api_events(self, caller: Caller, params: dict[str, Any]) -> Any:
        assert self.store is not None
        limit = _int_param(params, "limit", 50, 1, 10000)
        kind = params.get("kind")
        since = params.get("since")
        if kind is not None and not isinstance(kind, str):
            raise RequestError("kind must be a string")
        if since is not None and not isinstance(since, int | float):
            raise RequestError("since must be a unix time in seconds")
        subject = params.get("subject")
        if subject is not None and not isinstance(subject, str):
            raise RequestError("subject must be a string")
        return [e.to_json() for e in self.store.events(limit=limit, kind=kind, since=since, subject=subject)]

    async def _api_note(self, caller: Caller, params: dict[str, Any]) -> Any:
        text = params.get("text")
        if not isinstance(text, str) or not text.strip() or len(text) > 2000:
            raise RequestError("text must be 1-2000 characters")
        assert self.store is not None
        event = self.store.record("operator.note", actor=caller.actor, message=text.strip())
        return event.to_json()

    async def _api_reload(self, caller: Caller, params: dict[str, Any]) -> Any:
        self._record("operator.reload", actor=caller.actor, message="reload requested")
        self.request_reload()
        return {"reload": "requested"}

    def status(self, events: int = 10) -> dict[str, Any]:
        cfg = self.config
        assert self.store is not None and self.monitor is not None
        monitor = self.monitor
        sites = []
        for name, site in cfg.sites.items():
            view = monitor.site_view(name)
            sbc = monitor.target_view(f"site:{name}:sbc")
            calls = self.usage.sites.get(name) if self.usage else None
            sites.append(
                {"name": name, "role": site.role, "sbc": site.sbc, "seats": site.seats}
                | sbc
                | view
                | {"calls_in_progress": calls}
            )
        trunks = monitoring_api.trunk_views(self._monitoring_parts)
        return {
            "appliance": {
                "name": cfg.appliance.name,
                "version": __version__,
                "pid": os.getpid(),
                "config": str(self.config_path),
                "started_at": self._started_at,
                "uptime_s": round(self.clock.time() - self._started_at, 1),
                "tasks": self.supervisor.running(),
            },
            "sites": sites,
            "trunks": trunks,
            "failover": self.failover.view() if self.failover else {"state": "starting"},
            "coordination": self.coordination.view(),
            "events": [e.to_json() for e in self.store.events(limit=events)] if events else [],
        }


def _get(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _int_param(params: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = params.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(f"{key} must be an integer from {low} to {high}")
    return value
