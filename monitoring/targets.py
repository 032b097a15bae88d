"""Probe targets: what to probe, how, and how often.

Targets come from the configuration (sites' SBCs, health URLs and named
checks; carrier trunks) or from a URL typed at the command line
(``hotsite probe``). One URL syntax serves both:

    sip:HOST[:PORT][;transport=udp|tcp|tls]
    http://HOST[:PORT]/PATH   https://…
    tcp://HOST:PORT
    icmp://HOST

A target's name is stable and bounded, because it becomes a metric label:
``trunk:<name>``, ``site:<site>:sbc``, ``site:<site>:http``,
``site:<site>:<check>``, ``host:disk|memory|temperature``, ``link:<ifname>``,
``testcall:<hotline>`` and ``testcall:trunk:<name>`` (test calls, monitoring/TESTCALLS.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.fields import host_port
from monitoring.probes import kinds
from monitoring.probes.testcall import CallSpec

if TYPE_CHECKING:
    from monitoring.settings import MonitoringConfig as Config

Kind = str  # a name in monitoring.probes.kinds.KINDS
SIP_TRANSPORTS = kinds.SIP_TRANSPORTS


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    kind: Kind  # a name in monitoring.probes.kinds.KINDS
    host: str
    port: int = 0  # 0 where the kind has no port (icmp) or the URL carries it (http)
    transport: str = ""  # sip: udp|tcp|tls
    url: str = ""  # http(s): the full URL
    site: str | None = None
    trunk: str | None = None
    interval_s: float | None = None  # None: the [probes] default
    timeout_s: float | None = None
    accept_codes: frozenset[int] | None = None  # sip: None means any 2xx
    expect_body: str | None = None  # http: a regular expression the body must match
    critical: bool = False  # answering "unhealthy" means its site cannot serve (grey failure)
    call: CallSpec | None = None  # testcall: what to dial and how to judge it
    labels: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


def parse_url(url: str, name: str = "") -> Target:
    """Parse a target URL; raise ValueError saying what is wrong and what is expected.

    The URL's scheme picks its kind from :data:`monitoring.probes.kinds.KINDS`.
    """
    url = url.strip()
    name = name or url
    kind = kinds.for_url(url)
    if kind is None or kind.parse is None:
        raise ValueError(f"{url!r}: unknown target; expected {kinds.expected_urls()}")
    where = kind.parse(url)
    return Target(name, kind.name, where.host, where.port, where.transport, url=where.url)


def sip_url(address: str, transport: str) -> str:
    return f"sip:{address};transport={transport}"


def from_config(config: Config) -> list[Target]:
    """Every target the configuration names, in a stable order."""
    targets = []
    for site_name, site in config.sites.items():
        host, port = host_port(site.sbc)
        targets.append(Target(f"site:{site_name}:sbc", "sip", host, port, site.sbc_transport, site=site_name))
        if site.health_url:
            health = parse_url(site.health_url, f"site:{site_name}:http")
            targets.append(_with(health, site=site_name, critical=site.health_critical))
        for check_name, check in site.checks.items():
            target = parse_url(check.url, f"site:{site_name}:{check_name}")
            targets.append(
                _with(
                    target,
                    site=site_name,
                    interval_s=check.interval_s,
                    timeout_s=check.timeout_s,
                    expect_body=check.expect_body,
                    critical=check.critical,
                )
            )
    for resource in ("disk", "memory", "temperature"):
        targets.append(Target(f"host:{resource}", "host", resource, interval_s=config.host.interval_s))
    for interface in config.host.interfaces:
        targets.append(Target(f"link:{interface}", "link", interface))
    for trunk_name, trunk in config.trunks.items():
        host, port = host_port(trunk.address)
        targets.append(
            Target(
                f"trunk:{trunk_name}",
                "sip",
                host,
                port,
                trunk.transport,
                trunk=trunk_name,
                interval_s=trunk.interval_s,
                timeout_s=trunk.timeout_s,
                accept_codes=frozenset(trunk.accept_codes) if trunk.accept_codes else None,
            )
        )
    targets.extend(testcall_targets(config))
    return targets


def call_spec(config: Config, name: str, number: str, address: str) -> CallSpec:
    """A test call to ``number`` through ``address`` (host:port) with the [testcalls] settings."""
    t = config.testcalls
    peers = {site.sbc: f"site:{site_name}" for site_name, site in config.sites.items()}
    peers.update({trunk.address: f"trunk:{trunk_name}" for trunk_name, trunk in config.trunks.items()})
    host, port = host_port(address)
    return CallSpec(
        name,
        number,
        t.caller,
        host,
        port,
        duration_s=t.duration_s,
        setup_timeout_s=t.setup_timeout_s,
        answer_header=t.answer_header,
        audio_floor_dbov=t.audio_floor_dbov,
        expect_echo=t.echo,
        min_mos=t.min_mos,
        peers=peers,
    )


def testcall_targets(config: Config) -> list[Target]:
    """One target per hotline called through the carrier edge, one per trunk called through."""
    t = config.testcalls
    # The wait for a free call slot (max_concurrent) counts against the timeout: twice one call.
    timeout = min(t.interval_s, 2 * t.call_budget_s)

    def target(spec: CallSpec, trunk: str | None = None) -> Target:
        return Target(
            spec.name, "testcall", spec.host, spec.port, "udp", trunk=trunk,
            interval_s=t.interval_s, timeout_s=timeout, call=spec,
        )  # fmt: skip

    targets = []
    if t.hotlines and config.kamailio.sip is not None:  # the config's validator insists on the latter
        for hotline in t.hotlines:
            number = config.hotlines[hotline].number
            targets.append(target(call_spec(config, f"testcall:{hotline}", number, config.kamailio.sip)))
    number = t.number or next((h.number for h in config.hotlines.values()), "")
    for name in t.trunks:
        spec = call_spec(config, f"testcall:trunk:{name}", number, config.trunks[name].address)
        targets.append(target(spec, trunk=name))
    return targets


def _with(target: Target, **changes: object) -> Target:
    return dataclasses.replace(target, **changes)  # type: ignore[arg-type]
