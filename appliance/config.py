"""The one configuration loader: a TOML file validated against a schema.

Why a schema: a technician editing ``/etc/hotsite/hotsite.toml`` at 3 a.m.
must be told exactly which key is wrong, what value it holds and what is
expected, for every mistake at once, before the daemon acts on it. Every
section forbids unknown keys, because a misspelt key silently ignored is a
setting silently not applied.

Durations are plain seconds in keys ending ``_s``; addresses are
``host:port``. Secrets are never inline: keys ending ``_file`` name a file
that holds them, so the config can be shown, logged and bundled safely.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from appliance.errors import ConfigError
from monitoring.kpi_settings import CallKpisSection

DEFAULT_PATH = Path("/etc/hotsite/hotsite.toml")
ENV_VAR = "HOTSITE_CONFIG"

_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")
_E164_RE = re.compile(r"^\+[1-9][0-9]{6,14}$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def _split_host_port(value: str, default_port: int | None) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or host.count(":") and not host.startswith("["):
        # No port given (or a bare IPv6 address).
        host, port_text = value, ""
    host = host.strip("[]")
    if not port_text:
        if default_port is None:
            raise ValueError("expected host:port, e.g. 127.0.0.1:9477")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port must be 1-65535, got {port_text!r}")
    return host, int(port_text)


def _check_host(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME_RE.match(host):
            raise ValueError(f"{host!r} is neither an IP address nor a host name") from None
    return host


def _address(default_port: int | None) -> Any:
    def check(value: str) -> str:
        host, port = _split_host_port(value, default_port)
        _check_host(host)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    return AfterValidator(check)


def _match(pattern: re.Pattern[str], expected: str) -> Any:
    def check(value: str) -> str:
        if not pattern.match(value):
            raise ValueError(f"expected {expected}")
        return value

    return AfterValidator(check)


def _http_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
        raise ValueError("expected an http:// or https:// URL")
    return value


SipAddress = Annotated[str, _address(5060)]
ListenAddress = Annotated[str, _address(None)]
Phone = Annotated[str, _match(_E164_RE, "an E.164 phone number such as +8613800138000")]
Email = Annotated[str, _match(_EMAIL_RE, "an e-mail address such as ops@example.com")]
HttpUrl = Annotated[str, AfterValidator(_http_url)]
Seconds = Annotated[float, Field(gt=0, le=86400)]
Name = Annotated[str, _match(_NAME_RE, "a lower-case name: letters, digits, '-' or '_'")]


def host_port(address: str) -> tuple[str, int]:
    """Split a validated ``host:port`` into its parts."""
    host, port = _split_host_port(address, None)
    return host, port


class Section(BaseModel):
    """Base of every config section: strict about keys, immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _not_empty_path(value: Path) -> Path:
    if str(value) in ("", "."):
        raise ValueError("expected a directory path, not an empty string")
    return value


DirPath = Annotated[Path, AfterValidator(_not_empty_path)]


class ApplianceSection(Section):
    name: str = Field(default_factory=socket.gethostname)
    site: Name | None = None  # where this appliance stands (a key of [sites]); default: the first backup
    state_dir: DirPath = Path("/var/lib/hotsite")
    runtime_dir: DirPath = Path("/run/hotsite")
    socket_group: str | None = None
    # Roles on the control socket (appliance/roles.py): root and the service user are operators.
    operator_groups: list[str] = []
    operator_uids: list[int] = []
    read_only_groups: list[str] = []
    read_only_uids: list[int] = []
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["kv", "json"] = "kv"
    watchdog: bool = True


def _bcrypt_hash(value: str) -> str:
    if not re.match(r"^\$2[aby]?\$\d\d\$[./A-Za-z0-9]{53}$", value):
        raise ValueError("expected a bcrypt hash such as the one `htpasswd -nBC 10 USER` prints")
    return value


class MetricsSection(Section):
    """``/metrics``; TLS and basic auth optional, the Prometheus exporter-toolkit way."""

    enabled: bool = True
    listen: ListenAddress = "127.0.0.1:9477"
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    basic_auth_users: dict[str, Annotated[str, AfterValidator(_bcrypt_hash)]] = {}

    @model_validator(mode="after")
    def _pair(self) -> MetricsSection:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("give both tls_cert_file and tls_key_file, or neither")
        return self

    def server_options(self) -> dict[str, Any]:
        return {
            "tls_cert_file": self.tls_cert_file,
            "tls_key_file": self.tls_key_file,
            "basic_auth_users": dict(self.basic_auth_users),
        }


def _target_url(value: str) -> str:
    from monitoring.targets import parse_url

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
ProbeSeconds = Annotated[float, Field(ge=0.1, le=3600)]
ProbeTimeout = Annotated[float, Field(ge=0.01, le=3600)]


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
            if not self.url.lower().startswith(("http://", "https://")):
                raise ValueError("expect_body applies only to http(s):// checks")
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


InterfaceName = Annotated[str, _match(re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$"), "an interface name")]


class HostSection(Section):
    """The appliance itself: its interfaces (watched by netlink events) and resources."""

    interfaces: list[InterfaceName] = []
    interval_s: ProbeSeconds = 5.0
    disk_min_free_pct: float = Field(default=10.0, ge=0, le=100)
    memory_min_available_pct: float = Field(default=5.0, ge=0, le=100)
    max_temperature_c: float = Field(default=85.0, ge=20, le=150)


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

    number: Annotated[str, _match(re.compile(r"^\+?[0-9*#]{2,32}$"), "a dialled number such as 95588")]
    priority: int = Field(default=100, ge=1, le=10_000)  # 1 is served first
    agents: int = Field(default=0, ge=0)  # seats it needs where agents answer it
    failover: list[Name] = Field(min_length=1)  # destinations in order of preference


class TestcallsSection(Section):
    """Synthetic test calls with media (monitoring/TESTCALLS.md): hotlines judged by calls, not pings.

    ``hotlines`` are dialled through the carrier edge (``[kamailio] sip``) as a
    customer would; each of ``trunks`` is dialled through directly (to
    ``number``, default the first hotline's). Nothing is called unless listed:
    a test call occupies a channel and an agent's queue slot.
    """

    caller: Annotated[str, _match(re.compile(r"^\+?[0-9]{2,32}$"), "the test caller's number, digits")] = (
        "0000"
    )
    hotlines: list[Name] = []
    trunks: list[Name] = []
    number: (
        Annotated[str, _match(re.compile(r"^\+?[0-9*#]{2,32}$"), "a dialled number such as 95588")] | None
    ) = None
    interval_s: float = Field(default=300.0, ge=5, le=86400)
    duration_s: float = Field(default=3.0, ge=0.5, le=60)
    setup_timeout_s: float = Field(default=10.0, ge=1, le=120)
    max_concurrent: int = Field(default=2, ge=1, le=100)
    min_mos: float = Field(default=3.5, ge=1, le=4.5)  # a call with less is "poor audio", a failed call
    audio_floor_dbov: float = Field(default=-50.0, ge=-100, le=0)
    answer_header: Annotated[str, _match(re.compile(r"^[A-Za-z0-9-]{1,64}$"), "a SIP header name")] = "Server"
    rise: int = Field(default=1, ge=1, le=100)  # consecutive good calls before "calls ok"
    fall: int = Field(default=2, ge=1, le=100)  # consecutive failed calls before "calls failing"

    @model_validator(mode="after")
    def _a_call_fits_its_interval(self) -> TestcallsSection:
        budget = self.call_budget_s
        if self.interval_s < budget:
            raise ValueError(
                f"interval_s ({self.interval_s:g}) must be at least setup_timeout_s + duration_s + 5"
                f" ({budget:g}): a test call would still be running when the next is due"
            )
        return self

    @property
    def call_budget_s(self) -> float:
        """The longest one call may take: set-up, media, and the BYE's retransmissions."""
        return self.setup_timeout_s + self.duration_s + 5


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


def _route(value: str) -> str:
    from failover.actuators.netlink import parse_route

    parse_route(value)  # ValueError names the route and what is expected
    return " ".join(value.split())


class KamailioActuator(Section):
    """Dispatcher states and hotline htables in Kamailio (``[kamailio]`` says how to reach it)."""

    type: Literal["kamailio"]
    probing: bool = True  # re-enabled sets get state "ap": Kamailio keeps probing them itself
    token_file: Path | None = None  # default: beside kamailio.dispatcher_list, "<list>.token"
    timeout_s: ProbeSeconds = 5.0  # the whole apply or verify
    # The htable where fenced SBCs are listed for the generated config's ringing-call rescue;
    # "" for a hand-written Kamailio config that has no such table.
    fenced_table: str = "fenced"


class NetlinkActuator(Section):
    """A service address that lives on the serving site's side (moved at failover, with gratuitous ARP)."""

    type: Literal["netlink"]
    address: Annotated[str, AfterValidator(_ipv4_interface)]  # "192.0.2.10/24"; no prefix = /32
    interface: InterfaceName
    serve_on: Literal["failover", "normal"] = "failover"  # which routing puts the address here
    garp_count: int = Field(default=5, ge=0, le=100)
    garp_interval_s: ProbeSeconds = 1.0
    # Routes moved with the address: "10.9.0.0/16" or "10.9.0.0/16 via 192.0.2.1".
    routes: list[Annotated[str, AfterValidator(_route)]] = []


class HookActuator(Section):
    """An external command or webhook (a carrier's redirect API, another PBX); 0 exit or 2xx is success."""

    type: Literal["hook"]
    command: list[str] = []
    url: HttpUrl | None = None
    secret_file: Path | None = None
    timeout_s: ProbeSeconds = 10.0
    verify: bool = True  # the hook answers "--verify" (command) or action "verify" (url); see hook.py

    @model_validator(mode="after")
    def _one_way(self) -> HookActuator:
        if bool(self.command) == bool(self.url):
            raise ValueError("give exactly one of command (argv list) or url")
        return self


ActuatorConfig = Annotated[KamailioActuator | NetlinkActuator | HookActuator, Field(discriminator="type")]


class KamailioSection(Section):
    sip: SipAddress | None = None  # where the carrier edge takes SIP: the drill's test call goes there
    rpc_url: HttpUrl | None = None
    rpc_socket: Path | None = None
    rpc_timeout_s: ProbeSeconds = 2.0
    dispatcher_list: Path | None = None
    usage_interval_s: ProbeSeconds = 5.0  # how often calls in progress are read


class ContactSection(Section):
    name: str = Field(min_length=1)
    company: str = ""
    phone: Phone | None = None
    email: Email | None = None
    skills: list[Literal["telephony", "network", "power", "data", "facilities"]] = []
    # At night (paging.night) this contact is woken only for incidents at least this severe.
    wake_for: Literal["info", "warning", "error", "critical"] = "critical"


class GsmChannel(Section):
    type: Literal["gsm"]
    device: Path
    baud: Literal[9600, 19200, 38400, 57600, 115200, 230400, 460800] = 115200
    pin_file: Path | None = None
    smsc: Phone | None = None
    send_timeout_s: Seconds = 60.0  # AT+CMGS can take tens of seconds on a real network
    prompt_timeout_s: Seconds = 10.0
    retries: int = Field(default=3, ge=0, le=10)
    poll_s: Seconds = 30.0  # AT+CMGL polling: modems drop +CMTI
    health_s: Seconds = 60.0
    status_reports: bool = True


class SmtpChannel(Section):
    type: Literal["smtp"]
    host: str
    port: int = Field(default=587, ge=1, le=65535)
    starttls: bool = True
    username: str | None = None
    password_file: Path | None = None
    from_addr: Email
    ca_file: Path | None = None  # CA bundle for a private mail server's certificate
    timeout_s: Seconds = 20.0


class WebhookChannel(Section):
    type: Literal["webhook"]
    url: HttpUrl
    format: Literal["json", "pagerduty", "alertmanager"] = "json"
    secret_file: Path | None = None
    timeout_s: Seconds = 10.0
    retries: int = Field(default=3, ge=0, le=10)


Channel = Annotated[GsmChannel | SmtpChannel | WebhookChannel, Field(discriminator="type")]


class RotationSection(Section):
    """Contacts (by name) take turns of ``period_s``; the first turn starts at ``start``."""

    contacts: list[str] = Field(min_length=1)
    start: AwareDatetime
    period_s: float = Field(default=7 * 86400.0, gt=0, le=90 * 86400)


class OverrideSection(Section):
    rotation: Name
    contact: str = Field(min_length=1)
    start: AwareDatetime
    end: AwareDatetime

    @model_validator(mode="after")
    def _ends_after_start(self) -> OverrideSection:
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be after start ({self.start})")
        return self


class EscalationStepSection(Section):
    targets: list[str] = Field(min_length=1)  # contact names or "rotation:<name>"
    escalate_after_s: Seconds = 300.0
    channels: list[Name] = []  # fallback order for this step; default paging.channels


class EscalationPolicySection(Section):
    steps: list[EscalationStepSection] = Field(min_length=1)
    repeat: int = Field(default=1, ge=0, le=10)


class NightSection(Section):
    start: Annotated[str, _match(re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$"), "a time such as 22:00")]
    end: Annotated[str, _match(re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$"), "a time such as 07:00")]
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _known_zone(self) -> NightSection:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {self.timezone!r} is not a known zone, e.g. Asia/Shanghai") from None
        return self


class PagingSection(Section):
    """Who is paged, when, and through which channels (see appliance/paging/)."""

    enabled: bool = True
    channels: list[Name] = []  # fallback order; default: every configured channel, in file order
    default_policy: Name = "default"
    severity_policies: dict[Literal["info", "warning", "error", "critical"], Name] = {}
    policies: dict[Name, EscalationPolicySection] = {}
    rotations: dict[Name, RotationSection] = {}
    overrides: list[OverrideSection] = []
    night: NightSection | None = None
    rate_limit_per_hour: int = Field(default=20, ge=1, le=1000)  # trigger pages per contact
    # The country calling code used to read a national number a text arrives from
    # ("13800138000" -> "+8613800138000" with "86"). "" (default): only international
    # forms match the contacts' E.164 numbers.
    country_code: Annotated[
        str, _match(re.compile(r"^(\+?[1-9][0-9]{0,2})?$"), "a country calling code such as 86 or +44")
    ] = ""
    max_attempts: int = Field(default=8, ge=1, le=100)
    retry_backoff_s: Seconds = 30.0
    alertmanager_listen: ListenAddress | None = None
    alertmanager_token_file: Path | None = None
    # Who an ACK made with the token is recorded as (webhook:<name>); the request cannot choose.
    alertmanager_token_name: Name = "alertmanager"
    # Without a token the receiver refuses to start unless this is written (and config check warns).
    alertmanager_allow_unauthenticated: bool = False


AgentAddress = Annotated[str, _address(7450)]


class StreamSection(Section):
    """One replicated stream. ``source`` is the stream's name (or path) in the source agent's config."""

    kind: Literal["sqlite", "files"]
    source: str = Field(min_length=1)
    replica: Path
    rpo_budget_s: Seconds = 5.0
    post_change_command: list[str] = []  # files: run (argv, no shell) after a change was applied
    # files: mode bits never applied at the replica, whatever the source sends (default: setuid,
    # setgid, sticky, world-write); see appliance/replication/REPLICATION.md, "What the replica trusts"
    file_mode_mask: int = Field(default=0o7002, ge=0, le=0o7777)
    snapshot_interval_s: float = Field(default=3600.0, ge=0, le=86400)  # sqlite: 0 = no snapshots
    # sqlite: the most disk one transaction's journal may take (0: up to the database's size)
    journal_limit_mb: int = Field(default=0, ge=0, le=1 << 24)


class ReplicationSection(Section):
    """Where the source agent is, how to reach it (mutual TLS), and what it streams."""

    source_agent: AgentAddress | None = None
    server_name: str | None = None  # name in the agent's certificate; default: the host of source_agent
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    compression: Literal["none", "zlib", "zstd"] = "zlib"
    bandwidth_limit_bytes_s: int = Field(default=0, ge=0)  # 0 = unlimited
    keep_versions: int = Field(default=5, ge=0, le=1000)  # old file versions and database snapshots kept
    streams: dict[Name, StreamSection] = {}

    @model_validator(mode="after")
    def _tls_when_streaming(self) -> ReplicationSection:
        if self.streams:
            missing = [
                k
                for k in ("source_agent", "tls_cert_file", "tls_key_file", "tls_ca_file")
                if getattr(self, k) is None
            ]
            if missing:
                raise ValueError(
                    f"streams are configured but {', '.join(missing)} missing (mutual TLS is required)"
                )
        return self


class CoordinationSection(Section):
    """Who may act: the witness alone (one appliance), or a leader lease on an etcd cluster.

    ``etcd``: appliances sharing ``domain`` elect one leader through a lease of
    ``ttl_s`` (see ``failover/etcd.py``); ``endpoints`` are etcd client URLs
    (the v3 JSON gateway). Automatic failover needs a cluster of three or more.
    """

    backend: Literal["witness", "etcd"] = "witness"
    endpoints: list[HttpUrl] = Field(default=[], max_length=15)
    domain: Name = "default"  # routing domain: appliances sharing it share one leader
    ttl_s: int = Field(default=10, ge=2, le=300)  # etcd lease TTLs are whole seconds
    request_timeout_s: ProbeSeconds = 1.0
    retry_s: ProbeSeconds = 0.5  # how often a standby tries to take the lease
    # Each appliance publishes its site verdicts; with no failover.witness the leader takes
    # the other appliances' views as its witness (failover/peers.py).
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


class Config(Section):
    """The whole appliance configuration (the root of ``hotsite.toml``)."""

    appliance: ApplianceSection = ApplianceSection()
    metrics: MetricsSection = MetricsSection()
    sites: dict[Name, SiteSection]
    trunks: dict[Name, TrunkSection] = {}
    probes: ProbesSection = ProbesSection()
    host: HostSection = HostSection()
    failover: FailoverSection = FailoverSection()
    hotlines: dict[Name, HotlineSection] = {}
    destinations: dict[Name, DestinationSection] = {}
    actuators: dict[Name, ActuatorConfig] = {}
    kamailio: KamailioSection = KamailioSection()
    contacts: list[ContactSection] = []
    channels: dict[Name, Channel] = {}
    paging: PagingSection = PagingSection()
    replication: ReplicationSection = ReplicationSection()
    coordination: CoordinationSection = CoordinationSection()
    testcalls: TestcallsSection = TestcallsSection()
    callkpis: CallKpisSection = CallKpisSection()

    @model_validator(mode="after")
    def _testcalls_name_known_hotlines_and_trunks(self) -> Config:
        t = self.testcalls
        for key, names, known in (("hotlines", t.hotlines, self.hotlines), ("trunks", t.trunks, self.trunks)):
            unknown = [n for n in names if n not in known]
            if unknown:
                raise ValueError(
                    f"testcalls.{key} names {', '.join(map(repr, unknown))}: expected names of [{key}.*]"
                    f" ({', '.join(known) or 'none defined'})"
                )
        if t.hotlines and self.kamailio.sip is None:
            raise ValueError(
                "testcalls.hotlines needs kamailio.sip: the carrier edge the test calls go through"
            )
        if t.trunks and t.number is None and not self.hotlines:
            raise ValueError("testcalls.trunks needs testcalls.number (or a hotline) to dial through them")
        return self

    @model_validator(mode="after")
    def _one_primary_and_a_backup(self) -> Config:
        roles = [site.role for site in self.sites.values()]
        if roles.count("primary") != 1:
            raise ValueError(f"expected exactly one site with role 'primary', found {roles.count('primary')}")
        if "backup" not in roles:
            raise ValueError("expected at least one site with role 'backup'")
        if self.appliance.site is not None and self.appliance.site not in self.sites:
            raise ValueError(
                f"appliance.site {self.appliance.site!r} is not a site"
                f" (known: {', '.join(sorted(self.sites))})"
            )
        return self

    @property
    def my_site(self) -> str:
        """The site this appliance stands at (``appliance.site``, else the first backup site)."""
        from failover import plans

        return self.appliance.site or plans.backup_site(self)

    @property
    def primary(self) -> tuple[str, SiteSection]:
        return next((n, s) for n, s in self.sites.items() if s.role == "primary")

    def warnings(self) -> list[str]:
        """Settings that are valid but will not do what they seem to say."""
        from failover import plans

        notes = []
        witnessed = self.failover.witness is not None or self.coordination.backend == "etcd"
        if self.failover.policy == "auto" and not witnessed:
            notes.append(
                "failover.policy: 'auto' without failover.witness degrades to 'confirm':"
                " two sites alone cannot tell a dead primary from a cut link"
            )
        if not self.contacts:
            notes.append("contacts: none configured; incidents will page nobody")
        for name in self.sites:
            kinds = self.evidence_kinds(name)
            if len(kinds) < self.probes.min_evidence:
                notes.append(
                    f"sites.{name}: {len(kinds)} kind(s) of evidence ({', '.join(sorted(kinds))}) but"
                    f" probes.min_evidence is {self.probes.min_evidence}: this site can be judged degraded,"
                    " never down; add checks of other kinds (http, tcp, icmp)"
                )
        from appliance import configcheck
        from failover import etcd

        return notes + plans.warnings(self) + configcheck.warnings(self) + etcd.warnings(self)

    def evidence_kinds(self, site: str) -> set[str]:
        """The independent kinds of probe watching ``site`` (sip, http, tcp, icmp)."""
        section = self.sites[site]
        kinds = {"sip"} | ({"http"} if section.health_url else set())
        kinds |= {check.url.split(":", 1)[0].lower().removesuffix("s") for check in section.checks.values()}
        return kinds

    @model_validator(mode="after")
    def _timeouts_within_intervals(self) -> Config:
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


# ---------------------------------------------------------------------------
# Loading and error reporting


def resolve_path(cli_value: str | os.PathLike[str] | None) -> Path:
    """``--config`` wins over ``$HOTSITE_CONFIG``, which wins over the default."""
    if cli_value:
        return Path(cli_value)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_PATH


def load(path: Path) -> Config:
    """Read and validate ``path``; raise :class:`ConfigError` listing every mistake.

    Never hangs or exhausts memory on what ``path`` turns out to be (a FIFO,
    ``/dev/zero``, a huge or deeply nested file): see :mod:`appliance.configcheck`.
    """
    from appliance import configcheck

    try:
        text = configcheck.read_text(path)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    return parse(text, source=str(path))


def parse(text: str, source: str = "<config>") -> Config:
    from appliance import configcheck

    limit = configcheck.MAX_DEPTH
    too_deep = f"{source}: nested deeper than {limit} levels; a hotsite config never needs that"
    if configcheck.tolerant_depth_scan(text):
        raise ConfigError(too_deep, [f"(top level): nested deeper than {limit} levels"])
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}", [f"TOML syntax: {exc}"]) from None
    except (RecursionError, MemoryError):
        raise ConfigError(too_deep, [f"(top level): nested deeper than {limit} levels"]) from None
    deep = configcheck.check_depth(data)
    if deep is not None:
        raise ConfigError(too_deep, [f"{deep}: nested deeper than {limit} levels"])
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors(include_url=False)]
        raise ConfigError(f"{source}: {len(problems)} problem(s) in the configuration", problems) from None
    # Cross-references the schema cannot see; each feature keeps its own rules.
    from appliance.paging import settings as paging_settings
    from failover import etcd, plans

    problems = plans.problems(config) + paging_settings.problems(config) + etcd.problems(config)
    problems += configcheck.problems(config)
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s) in the configuration", problems)
    return config


def check_environment(config: Config) -> list[str]:
    """Problems a schema cannot see: every file the config names (``appliance.configcheck``), and
    replicas without room for their largest transaction (``replication.budget``)."""
    from appliance import configcheck
    from appliance.replication.budget import space_problems

    streams = config.replication.streams.items()
    sqlite = {n: (s.replica, s.journal_limit_mb) for n, s in streams if s.kind == "sqlite"}
    return configcheck.file_problems(config) + space_problems(sqlite)


def _describe(err: Any) -> str:
    parts, model = _walk(err["loc"])
    where = ".".join(parts) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, parent_model = _walk(err["loc"][:-1])
        known = sorted(parent_model.model_fields) if _is_model(parent_model) else []
        hint = f" (known keys here: {', '.join(known)})" if known else ""
        return f"{where}: unknown key{hint}"
    if kind == "missing":
        return f"{where}: required key is missing"
    message = err["msg"].removeprefix("Value error, ").replace("Input should be", "expected")
    if kind == "union_tag_invalid":
        return f"{where}.type: {err['input'].get('type')!r}: {message}"
    if isinstance(err.get("input"), dict):
        return f"{where}: {message}"
    return f"{where}: {_show(err.get('input'))}: {message}"


def _walk(loc: Iterable[Any]) -> tuple[list[str], Any]:
    """Follow an error location through the schema.

    Returns the key path as the user wrote it (pydantic inserts the tag of a
    discriminated union, e.g. ``channels.sms.gsm.baud``; the file says
    ``channels.sms.baud``) and the annotation found at its end.
    """
    parts: list[str] = []
    model: Any = Config
    for part in loc:
        if part == "[key]":  # pydantic's marker for an invalid table name
            continue
        if isinstance(model, _Tagged):
            model = model.by_tag(str(part))
            continue
        if isinstance(part, int) and parts:
            parts[-1] += f"[{part}]"
        else:
            parts.append(str(part))
        model = _descend(model, part) if model is not None else None
    return parts, model


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _descend(annotation: Any, part: Any) -> Any:
    annotation = _unwrap(annotation)
    if _is_model(annotation):
        field = annotation.model_fields.get(str(part))
        return field.annotation if field else None
    origin = typing.get_origin(annotation)
    if origin in (dict, list):
        inner = _unwrap(typing.get_args(annotation)[-1])
        members = _union_members(inner)
        if len(members) > 1:
            # A discriminated union keyed by "type": the error loc names the tag next.
            return _Tagged(members)
        return inner
    return None


class _Tagged:
    def __init__(self, members: list[Any]) -> None:
        self.members = members

    def by_tag(self, tag: str) -> Any:
        for member in self.members:
            field = member.model_fields.get("type")
            if field is not None and tag in typing.get_args(field.annotation):
                return member
        return None


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    members = _union_members(annotation)
    non_none = [m for m in members if m is not type(None)]
    if len(members) > 1 and len(non_none) == 1:
        return _unwrap(non_none[0])
    return annotation


def _union_members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]
