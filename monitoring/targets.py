"""Probe targets derived from the configuration.

A target's name is stable and bounded (it becomes a metric label):
``trunk:<name>`` for a carrier trunk, ``site:<name>:sbc`` for a site's SBC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from appliance.config import Config, host_port

Kind = Literal["sip"]


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    kind: Kind
    host: str
    port: int
    transport: str
    site: str | None = None
    trunk: str | None = None


def from_config(config: Config) -> list[Target]:
    targets = []
    for name, site in config.sites.items():
        host, port = host_port(site.sbc)
        targets.append(Target(f"site:{name}:sbc", "sip", host, port, site.sbc_transport, site=name))
    for name, trunk in config.trunks.items():
        host, port = host_port(trunk.address)
        targets.append(Target(f"trunk:{name}", "sip", host, port, trunk.transport, trunk=name))
    return targets
