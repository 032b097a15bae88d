"""The appliance: wires config, state store, probes, health model, metrics and the API.

This module only connects parts; decisions live in the pure modules
(``monitoring.health``), I/O in the edges (probes, store, API).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from appliance import __version__
from appliance import config as config_mod
from appliance.api import ApiServer, Caller, RequestError
from appliance.clock import Clock, SystemClock
from appliance.config import Config
from appliance.daemon import Daemon
from appliance.errors import ConfigError
from appliance.logs import kv
from appliance.store import Store
from appliance.systemd import Notifier
from monitoring import metrics as metrics_mod
from monitoring.health import TargetHealth, Thresholds, observe
from monitoring.probes.base import ProbeResult
from monitoring.probes.sip import SipOptionsProbe
from monitoring.scheduler import ProbeScheduler
from monitoring.targets import Target, from_config

log = logging.getLogger(__name__)

# Settings that only take effect at start; a reload that changes them says so.
RESTART_ONLY = ("appliance.state_dir", "appliance.runtime_dir", "metrics.listen", "metrics.enabled")


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
        self.metrics = metrics_mod.Metrics(registry or CollectorRegistry())
        self.store: Store | None = None
        self.api: ApiServer | None = None
        self._metrics_server: Any = None
        self._sip: SipOptionsProbe | None = None
        self._targets: dict[str, Target] = {}
        self._health: dict[str, TargetHealth] = {}
        self._started_at = 0.0
        self._started = False

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self._started_at = self.clock.time()
        self.store = Store.open(cfg.appliance.state_dir, clock=self.clock.time)
        self.api = ApiServer(
            cfg.appliance.runtime_dir,
            self._handlers(),
            group=cfg.appliance.socket_group,
            on_bad_request=lambda reason: self.metrics.api_bad_requests.labels(reason=reason).inc(),
        )
        await self.api.start()
        if cfg.metrics.enabled:
            host, port = config_mod.host_port(cfg.metrics.listen)
            self._metrics_server = metrics_mod.serve(self.metrics.registry, host, port)
        self.metrics.start_time.set(self._started_at)
        for problem in config_mod.check_environment(cfg):
            log.error("configuration problem", extra=kv(problem=problem))
        self._sip = SipOptionsProbe(
            clock=self.clock.monotonic,
            on_unmatched=lambda reason: self.metrics.unmatched_replies.labels(reason=reason).inc(),
        )
        targets = from_config(cfg)
        self.store.record(
            "daemon.start",
            message=f"hotsite {__version__} started",
            data={"pid": os.getpid(), "config": str(self.config_path), "targets": len(targets)},
        )
        self._set_targets(targets)
        self._started = True
        log.info(
            "hotsite started",
            extra=kv(version=__version__, config=self.config_path, targets=len(self._targets)),
        )

    async def reload(self) -> None:
        try:
            new = config_mod.load(self.config_path)
        except ConfigError as exc:
            self.metrics.config_reloads.labels(result="rejected").inc()
            for problem in exc.problems or [exc.message]:
                log.error("new configuration rejected; keeping the old one", extra=kv(problem=problem))
            self._record("config.reload_rejected", message=exc.message, data={"problems": exc.problems})
            return
        ignored = [key for key in RESTART_ONLY if _get(new, key) != _get(self.config, key)]
        for key in ignored:
            log.warning("setting changes only at restart", extra=kv(key=key))
        self.config = new
        await self.supervisor.stop("probes")
        self._set_targets(from_config(new))
        self.metrics.config_reloads.labels(result="applied").inc()
        self._record("config.reload", message="configuration reloaded", data={"restart_needed_for": ignored})
        log.info("configuration reloaded", extra=kv(targets=len(self._targets)))

    async def stop(self) -> None:
        if self._sip is not None:
            await self._sip.close()
        if self.api is not None:
            await self.api.close()
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
        up = sum(1 for h in self._health.values() if h.state == "up")
        return f"{up}/{len(self._health)} targets up"

    # -- probes and health -----------------------------------------------------

    def _set_targets(self, targets: list[Target]) -> None:
        old = self._targets
        self._targets = {t.name: t for t in targets}
        for name, target in old.items():
            if name not in self._targets or self._targets[name] != target:
                self._health.pop(name, None)
                self.metrics.forget_target(name, target.kind)
        for name, target in self._targets.items():
            if name not in self._health:
                self._health[name] = TargetHealth(name)
                self.metrics.set_target_state(name, target.kind, "unknown")
        probes = self.config.probes
        scheduler = ProbeScheduler(
            self._probe,
            self._on_result,
            interval_s=probes.interval_s,
            timeout_s=probes.timeout_s,
            clock=self.clock,
        )
        self.supervisor.start("probes", lambda: scheduler.run(list(self._targets.values())))

    async def _probe(self, target: Target) -> ProbeResult:
        assert self._sip is not None
        return await self._sip.probe(
            target.name, target.host, target.port, timeout=self.config.probes.timeout_s
        )

    def _on_result(self, result: ProbeResult) -> None:
        target = self._targets.get(result.target)
        if target is None:  # a result that raced a reload
            return
        probes = self.config.probes
        before = self._health[result.target]
        after = observe(before, result, Thresholds(rise=probes.rise, fall=probes.fall))
        self._health[result.target] = after
        self.metrics.probes.labels(target=target.name).inc()
        self.metrics.last_code.labels(target=target.name).set(result.code or 0)
        if result.ok and result.rtt_s is not None:
            self.metrics.probe_rtt.labels(target=target.name).observe(result.rtt_s)
        elif not result.ok:
            self.metrics.probe_failures.labels(target=target.name, reason=result.reason).inc()
        if after.state != before.state:
            self.metrics.set_target_state(target.name, target.kind, after.state)
            log.info(
                f"{target.name} is {after.state}",
                extra=kv(target=target.name, state=after.state, was=before.state, reason=after.reason),
            )
            self._record(
                "probe.state",
                subject=target.name,
                message=f"{target.name} {before.state} -> {after.state}: {after.reason}",
                data={
                    "state": after.state,
                    "was": before.state,
                    "code": result.code,
                    "reason": result.reason,
                },
            )

    def _record(self, kind: str, **fields: Any) -> None:
        if self.store is not None:
            self.store.record(kind, **fields)

    # -- control API -----------------------------------------------------------

    def _handlers(self) -> dict[str, Any]:
        return {
            "ping": self._api_ping,
            "status": self._api_status,
            "events": self._api_events,
            "note": self._api_note,
            "reload": self._api_reload,
        }

    async def _api_ping(self, caller: Caller, params: dict[str, Any]) -> Any:
        return {"pong": True, "version": __version__, "pid": os.getpid()}

    async def _api_status(self, caller: Caller, params: dict[str, Any]) -> Any:
        return self.status(events=_int_param(params, "events", 10, 0, 1000))

    async def _api_events(self, caller: Caller, params: dict[str, Any]) -> Any:
        assert self.store is not None
        limit = _int_param(params, "limit", 50, 1, 10000)
        kind = params.get("kind")
        since = params.get("since")
        if kind is not None and not isinstance(kind, str):
            raise RequestError("kind must be a string")
        if since is not None and not isinstance(since, int | float):
            raise RequestError("since must be a unix time in seconds")
        return [e.to_json() for e in self.store.events(limit=limit, kind=kind, since=since)]

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
        now_mono = self.clock.monotonic()

        def health_json(name: str) -> dict[str, Any]:
            h = self._health.get(name) or TargetHealth(name)
            last = h.last
            return {
                "target": name,
                "state": h.state,
                "since_s": None if h.since is None else round(now_mono - h.since, 3),
                "reason": h.reason,
                "rtt_ms": None if last is None or last.rtt_s is None else round(last.rtt_s * 1000, 3),
                "last_code": None if last is None else last.code,
            }

        sites = []
        for name, site in cfg.sites.items():
            sbc = health_json(f"site:{name}:sbc")
            sites.append({"name": name, "role": site.role, "sbc": site.sbc, "seats": site.seats, **sbc})
        trunks = [
            {"name": name, "address": trunk.address, "carrier": trunk.carrier, **health_json(f"trunk:{name}")}
            for name, trunk in cfg.trunks.items()
        ]
        assert self.store is not None
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
            "failover": {
                "state": "monitoring",
                "policy": cfg.failover.policy,
                "detail": "watching only: the failover engine is not part of this release",
            },
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
