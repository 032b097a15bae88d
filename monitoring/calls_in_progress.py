"""Trunk usage ("line resources"): calls in progress per site and per trunk, from Kamailio.

The carrier-edge Kamailio counts dialogs in two profiles, ``calls_by_set``
(by dispatcher set, i.e. by site) and ``calls_by_trunk`` (by the carrier
trunk's source address); this reads them every ``interval_s``. When
Kamailio cannot be read the figures are dropped (not frozen at their last
value) and ``hotsite_kamailio_rpc_up`` says so.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from appliance.fields import host_port
from appliance.kamailio import KamailioRpc, KamailioRpcError
from appliance.logs import kv
from monitoring.metrics import Metrics
from monitoring.settings import MonitoringConfig as Config

log = logging.getLogger(f"hotsite.{__name__}")


class UsageMonitor:
    def __init__(self, config: Config, rpc: KamailioRpc, metrics: Metrics) -> None:
        self._config = config
        self._rpc = rpc
        self._metrics = metrics
        self.sites: dict[str, int] = {}
        self.trunks: dict[str, int] = {}
        self.error: str | None = None

    async def run(self) -> None:
        interval = self._config.kamailio.usage_interval_s
        while True:
            await self.poll()
            await asyncio.sleep(interval)

    async def poll(self) -> None:
        try:
            sites = {
                name: await self._rpc.profile_size("calls_by_set", str(site.kamailio_set))
                for name, site in self._config.sites.items()
            }
            trunks = {
                name: await self._rpc.profile_size("calls_by_trunk", host_port(trunk.address)[0])
                for name, trunk in self._config.trunks.items()
            }
        except KamailioRpcError as exc:
            if self.error is None:
                log.warning("cannot read calls in progress from Kamailio", extra=kv(error=exc.message))
            self.error = exc.message
            self.sites, self.trunks = {}, {}
            self._metrics.kamailio_rpc_up.set(0)
            self._metrics.site_calls.clear()
            self._metrics.trunk_calls.clear()
            return
        if self.error is not None:
            log.info("reading calls in progress from Kamailio again")
        self.error = None
        self.sites, self.trunks = sites, trunks
        self._metrics.kamailio_rpc_up.set(1)
        for name, calls in sites.items():
            self._metrics.site_calls.labels(site=name).set(calls)
        for name, calls in trunks.items():
            self._metrics.trunk_calls.labels(trunk=name).set(calls)

    def view(self) -> dict[str, Any]:
        return {"sites": self.sites, "trunks": self.trunks, "error": self.error}
