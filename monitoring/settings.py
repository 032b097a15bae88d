"""Monitoring's sections of ``hotsite.toml``: sites, trunks, probes, host, testcalls.

Monitoring owns what is watched and how often; the failover and paging
features read the sites it defines. Checks that need only these sections
live here (:class:`MonitoringSettings`' validators, :func:`warnings`); checks
that tie them to another feature's sections (test calls naming hotlines)
live at the top, in :class:`appliance.config.Config`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, Protocol

from pydantic import AfterValidator, Field, model_validator

from appliance.core_settings import ApplianceSection, KamailioSection
from appliance.fields import (
    Dialled,
    HttpUrl,
    InterfaceName,
    Name,
    ProbeSeconds,
    ProbeTimeout,
    Section,
    SipAddress,
    match,
)
from monitoring.kpi_settings import CallKpisSection
from monitoring.probes import kinds
from monitoring.targets import parse_url


def _target_url(value: str) -> str:
    parse_url(value)
    return value


def _accept_codes(codes: list[int]) -> list[int]:
    for code in codes:
        if not 100 <= code <= 699:
            raise ValueError(f"SIP status codes are 100-699, got {code}")
        if code == 408:
            raise ValueError(
                "408 is never accepted: it is generated locally on timeout and would hide a dead trunk"
            )
    return codes


TargetUrl = Annotated[str, AfterValidator(_target_url)]


class CheckSection(Section):
    """One more vantage point on a site: an ACD port, a CTI health page, a gateway."""

    url: TargetUrl
    interval_s: ProbeSeconds | None = None
    timeout_s: ProbeTimeout | None = None
    expect_body: str | None = None
    # The site itself saying it cannot serve (this check answers, but "no"): a grey failure.
    critical: bool = False

    @model_validator(mode="after")
    def _body_match_is_a_regex(self) -> CheckSection:
        if self.expect_body is not None:
            if not kinds.get(parse_url(self.url).kind).matches_body:
                labels = [k.label for k in kinds.KINDS.values() if k.matches_body]
                raise ValueError(f"expect_body applies only to {' and '.join(labels)} checks")
            try:
                re.compile(self.expect_body)
            except re.error as exc:
                raise ValueError(f"expect_body is not a valid regular expression: {exc}") from None
        return self


class SiteSection(Section):
    role: Literal["primary", "backup"]
    description: str = ""
    sbc: SipAddress
    sbc_transport: Literal["udp", "tcp", "tls"] = "udp"
    health_url: HttpUrl | None = None
    health_critical: bool = True  # a health URL answering "unhealthy" means the site cannot serve
    checks: dict[Name, CheckSection] = {}
    kamailio_set: int = Field(ge=1, le=65535)
    seats: int = Field(default=0, ge=0)


class TrunkSection(Section):
    address: SipAddress
    transport: Literal["udp", "tcp", "tls"] = "udp"
    carrier: str = ""
    interval_s: ProbeSeconds | None = None
    timeout_s: ProbeTimeout | None = None
    accept_codes: Annotated[list[int], AfterValidator(_accept_codes)] = []


class ProbesSection(Section):
    interval_s: ProbeSeconds = 1.0
    timeout_s: ProbeTimeout = 0.8
    rise: int = Field(default=2, ge=1, le=100)
    fall: int = Field(default=3, ge=1, le=100)
    damping_s: float = Field(default=0.0, ge=0, le=3600)
    min_evidence: int = Field(default=2, ge=1, le=4)
    max_in_flight: int = Field(default=256, ge=1, le=100_000)
    tls_ca_file: Path | None = None  # CA bundle for sip:…;transport=tls and https checks; default: system CAs

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> ProbesSection:
        if self.timeout_s > self.interval_s:
            raise ValueError(
                f"timeout_s ({self.timeout_s}) must not exceed interval_s ({self.interval_s}):"
                " a probe would still be running when the next one is due"
            )
        return self


class HostSection(Section):
    """The appliance itself: its interfaces (watched by netlink events) and resources."""

    interfaces: list[InterfaceName] = []
    interval_s: ProbeSeconds = 5.0
    disk_min_free_pct: float = Field(default=10.0, ge=0, le=100)
    memory_min_available_pct: float = Field(default=5.0, ge=0, le=100)
    max_temperature_c: float = Field(default=85.0, ge=20, le=150)


class TestcallsSection(Section):
    """Synthetic test calls with media (monitoring/TESTCALLS.md): hotlines judged by calls, not pings.

    ``hotlines`` are dialled through the carrier edge (``[kamailio] sip``) as a
    customer would; each of ``trunks`` is dialled through directly (to
    ``number``, default the first hotline's). Nothing is called unless listed:
    a test call occupies a channel and an agent's queue slot.
    """

    caller: Annotated[str, match(re.compile(r"^\+?[0-9]{2,32}$"), "the test caller's number, digits")] = (
        "0000"
    )
    hotlines: list[Name] = []
    trunks: list[Name] = []
    number: Dialled | None = None
    interval_s: float = Field(default=300.0, ge=5, le=86400)
    duration_s: float = Field(default=3.0, ge=0.5, le=60)
    setup_timeout_s: float = Field(default=10.0, ge=1, le=120)
    max_concurrent: int = Field(default=2, ge=1, le=100)
    min_mos: float = Field(default=3.5, ge=1, le=4.5)  # a call with less is "poor audio", a failed call
    audio_floor_dbov: float = Field(default=-50.0, ge=-100, le=0)
    # The far end echoes the caller's RTP (an echo test number; the lab's SBCs): then a call whose
    # own packets never come back while the far end's arrive is "one-way audio", a failed call.
    echo: bool = False
    answer_header: Annotated[str, match(re.compile(r"^[A-Za-z0-9-]{1,64}$"), "a SIP header name")] = "Server"
    rise: int = Field(default=1, ge=1, le=100)  # consecutive good calls before "calls ok"
    fall: int = Field(default=2, ge=1, le=100)  # consecutive failed calls before "calls failing"
    # After every failover and failback: call each of ``hotlines`` until it answers where the plan
    # sends it, with audio, for at most verify_timeout_s (failover/verification.py).
    verify_changes: bool = True
    verify_timeout_s: float = Field(default=60.0, ge=5, le=900)
    # Test calls as critical evidence (monitoring/callevidence.py): this many consecutive failed calls
    # to hotlines a site serves, within site_critical_window_s, judge that site down (a grey failure),
    # and routing moves as on any critical evidence. 0 (the default): test calls never move routing.
    site_critical_failures: int = Field(default=0, ge=0, le=100)
    site_critical_window_s: float = Field(default=900.0, ge=10, le=86400)

    @model_validator(mode="after")
    def _a_call_fits_its_interval(self) -> TestcallsSection:
        budget = self.call_budget_s
        if self.interval_s < budget:
            raise ValueError(
                f"interval_s ({self.interval_s:g}) must be at least setup_timeout_s + duration_s + 5"
                f" ({budget:g}): a test call would still be running when the next is due"
            )
        return self

    @model_validator(mode="after")
    def _critical_run_fits_its_window(self) -> TestcallsSection:
        n, window = self.site_critical_failures, self.site_critical_window_s
        if n > 1 and window < (n - 1) * self.interval_s:
            raise ValueError(
                f"site_critical_window_s ({window:g}) must be at least (site_critical_failures - 1)"
                f" x interval_s ({(n - 1) * self.interval_s:g}): {n} failed test calls could never"
                " fall within it"
            )
        return self

    @property
    def call_budget_s(self) -> float:
        """The longest one call may take: set-up, media, and the BYE's retransmissions."""
        return self.setup_timeout_s + self.duration_s + 5


class MonitoringSettings(Section):
    """The root keys monitoring owns, and the checks that need only them."""

    sites: dict[Name, SiteSection]
    trunks: dict[Name, TrunkSection] = {}
    probes: ProbesSection = ProbesSection()
    host: HostSection = HostSection()
    testcalls: TestcallsSection = TestcallsSection()
    callkpis: CallKpisSection = CallKpisSection()  # per-trunk call KPIs (monitoring/KPIS.md)

    @model_validator(mode="after")
    def _one_primary_and_a_backup(self) -> MonitoringSettings:
        roles = [site.role for site in self.sites.values()]
        if roles.count("primary") != 1:
            raise ValueError(f"expected exactly one site with role 'primary', found {roles.count('primary')}")
        if "backup" not in roles:
            raise ValueError("expected at least one site with role 'backup'")
        return self

    @model_validator(mode="after")
    def _timeouts_within_intervals(self) -> MonitoringSettings:
        default_interval, default_timeout = self.probes.interval_s, self.probes.timeout_s
        places = [(f"trunks.{name}", t.interval_s, t.timeout_s) for name, t in self.trunks.items()] + [
            (f"sites.{site}.checks.{name}", c.interval_s, c.timeout_s)
            for site, section in self.sites.items()
            for name, c in section.checks.items()
        ]
        for where, interval, timeout in places:
            interval, timeout = interval or default_interval, timeout or default_timeout
            if timeout > interval:
                raise ValueError(f"{where}: timeout_s ({timeout}) must not exceed interval_s ({interval})")
        return self

    @property
    def primary(self) -> tuple[str, SiteSection]:
        return next((n, s) for n, s in self.sites.items() if s.role == "primary")

    def evidence_kinds(self, site: str) -> set[str]:
        """The independent kinds of probe watching ``site`` (sip, http, tcp, icmp)."""
        section = self.sites[site]
        found = {"sip"} | ({"http"} if section.health_url else set())  # the SBC and the health URL
        return found | {parse_url(check.url).kind for check in section.checks.values()}


class Dialable(Protocol):
    """What monitoring reads of a hotline (owned by failover): the number a test call dials."""

    @property
    def number(self) -> str: ...


class MonitoringConfig(Protocol):
    """What monitoring reads of the root config: its own sections, the core's, and hotline numbers."""

    @property
    def appliance(self) -> ApplianceSection: ...
    @property
    def kamailio(self) -> KamailioSection: ...
    @property
    def sites(self) -> Mapping[str, SiteSection]: ...
    @property
    def trunks(self) -> Mapping[str, TrunkSection]: ...
    @property
    def probes(self) -> ProbesSection: ...
    @property
    def host(self) -> HostSection: ...
    @property
    def testcalls(self) -> TestcallsSection: ...
    @property
    def callkpis(self) -> CallKpisSection: ...
    @property
    def hotlines(self) -> Mapping[str, Dialable]: ...


def problems(cfg: MonitoringSettings) -> list[str]:
    """Channels given for a trunk that is not configured."""
    return [
        f"callkpis.channels names {name!r}: expected a name of [trunks.*] ({', '.join(cfg.trunks) or 'none'})"
        for name in cfg.callkpis.channels
        if name not in cfg.trunks
    ]


def warnings(cfg: MonitoringSettings) -> list[str]:
    """Sites watched by too few independent kinds of probe to ever be judged down."""
    notes = []
    others = ", ".join(k for k in kinds.evidence_kinds() if k != "sip")  # the SBC itself is sip
    for name in cfg.sites:
        seen = cfg.evidence_kinds(name)
        if len(seen) < cfg.probes.min_evidence:
            notes.append(
                f"sites.{name}: {len(seen)} kind(s) of evidence ({', '.join(sorted(seen))}) but"
                f" probes.min_evidence is {cfg.probes.min_evidence}: this site can be judged degraded,"
                f" never down; add checks of other kinds ({others})"
            )
    return notes
