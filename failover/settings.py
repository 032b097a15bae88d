"""Failover's sections of ``hotsite.toml``: ``[failover]``, ``[hotlines]``, ``[destinations]``,
``[actuators]`` and ``[coordination]``.

The schema classes end in ``Settings`` or ``Section`` so they never share a
name with the runtime objects built from them (``KamailioActuatorSettings``
configures a :class:`failover.actuators.kamailio.KamailioActuator`).
:class:`FailoverConfig` says what of the root config failover reads: the
features below it (monitoring's sites) and beside it (replication's
streams, for the drill) are read through it, never imported from the top.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, Protocol

from pydantic import AfterValidator, Field, model_validator

from appliance.fields import (
    Dialled,
    HttpUrl,
    InterfaceName,
    Name,
    ProbeSeconds,
    Seconds,
    Section,
)
from appliance.replication.replica_settings import ReplicationSection
from failover import etcd, plans
from monitoring.settings import MonitoringConfig, SiteSection


class FailoverSection(Section):
    policy: Literal["auto", "confirm", "manual"] = "confirm"
    witness: HttpUrl | None = None
    witness_timeout_s: ProbeSeconds = 2.0
    witness_token_file: Path | None = None
    witness_ca_file: Path | None = None
    # An older view is no vote: set it above the witness's interval + timeout.
    witness_max_age_s: ProbeSeconds = 10.0
    witness_poll_s: ProbeSeconds = 1.0  # how often the witness is asked
    tick_s: ProbeSeconds = 0.5  # how often timers (hold-down, dwell, confirm) are evaluated
    hold_down_s: Seconds = 30.0  # the primary must stay judged down this long before acting
    min_dwell_s: Seconds = 300.0  # minimum time in a routing before moving again automatically
    max_auto_per_hour: int = Field(default=1, ge=0, le=60)
    confirm_timeout_s: float = Field(default=0.0, ge=0, le=86400)  # confirm: proceed after this; 0 = never
    failback: Literal["manual", "auto"] = "manual"
    failback_stable_s: Seconds = 600.0  # auto failback: the primary up this long first
    step_timeout_s: ProbeSeconds = 10.0  # each runbook step
    reconcile_interval_s: ProbeSeconds = 10.0
    test_number: str | None = None  # dialled by `hotsite drill` through the backup path


class HotlineSection(Section):
    """One called number (a product line or customer tier) and where it goes in a failover."""

    number: Dialled
    priority: int = Field(default=100, ge=1, le=10_000)  # 1 is served first
    agents: int = Field(default=0, ge=0)  # seats it needs where agents answer it
    failover: list[Name] = Field(min_length=1)  # destinations in order of preference


class DestinationSection(Section):
    """Somewhere a hotline can be sent besides a site's agents: IVR, announcement, remote agents."""

    kind: Literal["ivr", "announcement", "remote_agents"]
    kamailio_set: int = Field(ge=1, le=65535)
    capacity: int = Field(default=0, ge=0)  # agent seats; 0 = unlimited (self-service)


def _ipv4_interface(value: str) -> str:
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise ValueError("expected an IPv4 address with optional /prefix, e.g. 192.0.2.10/24") from None
    if iface.version != 4:
        raise ValueError("only IPv4 service addresses are supported (gratuitous ARP; no IPv6 NA yet)")
    return str(iface) if "/" in value else f"{iface.ip}/32"


def parse_route(text: str) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Address | None]:
    """``"10.9.0.0/16"`` or ``"10.9.0.0/16 via 192.0.2.1"``; ValueError says what is expected
    (the config loader prefixes the key and the value)."""
    parts = text.split()
    if len(parts) not in (1, 3) or (len(parts) == 3 and parts[1] != "via"):
        raise ValueError("expected 'PREFIX' or 'PREFIX via GATEWAY', e.g. '10.9.0.0/16 via 192.0.2.1'")
    try:
        dst = ipaddress.IPv4Network(parts[0], strict=True)
        gateway = ipaddress.IPv4Address(parts[2]) if len(parts) == 3 else None
    except ValueError as exc:
        raise ValueError(f"{exc} (IPv4 only)") from None
    return dst, gateway


def _route(value: str) -> str:
    parse_route(value)  # ValueError names the route and what is expected
    return " ".join(value.split())


class KamailioActuatorSettings(Section):
    """Dispatcher states and hotline htables in Kamailio (``[kamailio]`` says how to reach it)."""

    type: Literal["kamailio"]
    probing: bool = True  # re-enabled sets get state "ap": Kamailio keeps probing them itself
    token_file: Path | None = None  # default: beside kamailio.dispatcher_list, "<list>.token"
    timeout_s: ProbeSeconds = 5.0  # the whole apply or verify
    # The htable where fenced SBCs are listed for the generated config's ringing-call rescue;
    # "" for a hand-written Kamailio config that has no such table.
    fenced_table: str = "fenced"


class NetlinkActuatorSettings(Section):
    """A service address that lives on the serving site's side (moved at failover, with gratuitous ARP)."""

    type: Literal["netlink"]
    address: Annotated[str, AfterValidator(_ipv4_interface)]  # "192.0.2.10/24"; no prefix = /32
    interface: InterfaceName
    serve_on: Literal["failover", "normal"] = "failover"  # which routing puts the address here
    garp_count: int = Field(default=5, ge=0, le=100)
    garp_interval_s: ProbeSeconds = 1.0
    # Routes moved with the address: "10.9.0.0/16" or "10.9.0.0/16 via 192.0.2.1".
    routes: list[Annotated[str, AfterValidator(_route)]] = []


class HookActuatorSettings(Section):
    """An external command or webhook (a carrier's redirect API, another PBX); 0 exit or 2xx is success."""

    type: Literal["hook"]
    command: list[str] = []
    url: HttpUrl | None = None
    secret_file: Path | None = None
    timeout_s: ProbeSeconds = 10.0
    verify: bool = True  # the hook answers "--verify" (command) or action "verify" (url); see hook.py

    @model_validator(mode="after")
    def _one_way(self) -> HookActuatorSettings:
        if bool(self.command) == bool(self.url):
            raise ValueError("give exactly one of command (argv list) or url")
        return self


ActuatorSettings = Annotated[
    KamailioActuatorSettings | NetlinkActuatorSettings | HookActuatorSettings, Field(discriminator="type")
]


class CoordinationSection(Section):
    """Who may act: the witness alone (one appliance), or a leader lease on an etcd cluster.

    ``etcd``: appliances sharing ``domain`` elect one leader through a lease of
    ``ttl_s`` (see ``failover/etcd/election.py`` and ``failover/lease.py``); ``endpoints``
    are etcd client URLs (the v3 JSON gateway). Automatic failover needs a cluster of three or more.
    """

    backend: Literal["witness", "etcd"] = "witness"
    endpoints: list[HttpUrl] = Field(default=[], max_length=15)
    domain: Name = "default"  # routing domain: appliances sharing it share one leader
    ttl_s: int = Field(default=10, ge=2, le=300)  # etcd lease TTLs are whole seconds
    request_timeout_s: ProbeSeconds = 1.0
    retry_s: ProbeSeconds = 0.5  # how often a standby tries to take the lease
    # Each appliance publishes its site verdicts; with no failover.witness the leader takes
    # the other appliances' views as its witness (failover/etcd/peers.py).
    views_interval_s: ProbeSeconds = 1.0
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    credentials_file: Path | None = None  # one line "user:password" (etcd authentication)
    # The cluster's --election-timeout (the etcd role's etcd_election_ms): states the takeover bound.
    etcd_election_ms: int = Field(default=1000, ge=10, le=50000)

    @model_validator(mode="after")
    def _consistent(self) -> CoordinationSection:
        if self.backend == "etcd" and not self.endpoints:
            raise ValueError("backend 'etcd' needs endpoints (etcd client URLs)")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file (client certificate), or neither")
        if len(set(self.endpoints)) != len(self.endpoints):
            raise ValueError("endpoints: the same URL is listed twice")
        if self.request_timeout_s * 3 > self.ttl_s:
            raise ValueError(
                f"request_timeout_s ({self.request_timeout_s:g}) must be at most"
                f" a third of ttl_s ({self.ttl_s})"
            )
        return self


class FailoverSettings(Section):
    """The root keys failover owns."""

    failover: FailoverSection = FailoverSection()
    hotlines: dict[Name, HotlineSection] = {}
    destinations: dict[Name, DestinationSection] = {}
    actuators: dict[Name, ActuatorSettings] = {}
    coordination: CoordinationSection = CoordinationSection()


class FailoverConfig(MonitoringConfig, Protocol):
    """What failover reads of the root config (structural: the root :class:`Config` fits it):
    monitoring's view of it, and failover's own sections and replication's streams (the drill)."""

    @property
    def primary(self) -> tuple[str, SiteSection]: ...
    @property
    def failover(self) -> FailoverSection: ...
    @property
    def hotlines(self) -> Mapping[str, HotlineSection]: ...
    @property
    def destinations(self) -> Mapping[str, DestinationSection]: ...
    @property
    def actuators(self) -> Mapping[str, ActuatorSettings]: ...
    @property
    def coordination(self) -> CoordinationSection: ...
    @property
    def replication(self) -> ReplicationSection: ...
    @property
    def my_site(self) -> str: ...


def problems(cfg: FailoverConfig) -> list[str]:
    """Cross-references the schema cannot see: plans that name no destination, etcd bounds."""
    return plans.problems(cfg) + etcd.problems(cfg)


def warnings(cfg: FailoverConfig) -> list[str]:
    """Settings that are valid but will not do what they seem to say."""
    notes = []
    witnessed = cfg.failover.witness is not None or cfg.coordination.backend == "etcd"
    if cfg.failover.policy == "auto" and not witnessed:
        notes.append(
            "failover.policy: 'auto' without failover.witness degrades to 'confirm':"
            " two sites alone cannot tell a dead primary from a cut link"
        )
    return notes + plans.warnings(cfg) + etcd.warnings(cfg)
