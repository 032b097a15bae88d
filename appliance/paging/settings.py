"""Paging's sections of ``hotsite.toml`` and what is built from them: the :class:`Roster` and the channels.

``[contacts]``, ``[channels]`` and ``[paging]`` are defined here (the schema
classes end in ``Settings``/``Section``: ``GsmChannelSettings`` configures a
:class:`appliance.paging.modem.GsmChannel`). :func:`problems` checks what no
single key can: that rotations, overrides and policies name contacts,
rotations and channels that exist.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import AwareDatetime, Field, model_validator

from appliance import secretfile
from appliance.core_settings import ApplianceSection
from appliance.errors import ConfigError
from appliance.fields import Email, HttpUrl, ListenAddress, Name, Phone, Seconds, Section, match
from appliance.paging.channel import Channel
from appliance.paging.oncall import (
    ROTATION_PREFIX,
    Contact,
    Night,
    Override,
    Policy,
    Roster,
    Rotation,
    Step,
)


class ContactSection(Section):
    name: str = Field(min_length=1)
    company: str = ""
    phone: Phone | None = None
    email: Email | None = None
    skills: list[Literal["telephony", "network", "power", "data", "facilities"]] = []
    # At night (paging.night) this contact is woken only for incidents at least this severe.
    wake_for: Literal["info", "warning", "error", "critical"] = "critical"


class GsmChannelSettings(Section):
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


class SmtpChannelSettings(Section):
    type: Literal["smtp"]
    host: str
    port: int = Field(default=587, ge=1, le=65535)
    starttls: bool = True
    username: str | None = None
    password_file: Path | None = None
    from_addr: Email
    ca_file: Path | None = None  # CA bundle for a private mail server's certificate
    timeout_s: Seconds = 20.0


class WebhookChannelSettings(Section):
    type: Literal["webhook"]
    url: HttpUrl
    format: Literal["json", "pagerduty", "alertmanager"] = "json"
    secret_file: Path | None = None
    timeout_s: Seconds = 10.0
    retries: int = Field(default=3, ge=0, le=10)


ChannelSettings = Annotated[
    GsmChannelSettings | SmtpChannelSettings | WebhookChannelSettings, Field(discriminator="type")
]


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
    start: Annotated[str, match(re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$"), "a time such as 22:00")]
    end: Annotated[str, match(re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$"), "a time such as 07:00")]
    timezone: str = "UTC"

    @model_validator(mode="after")
    def _known_zone(self) -> NightSection:
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
        str, match(re.compile(r"^(\+?[1-9][0-9]{0,2})?$"), "a country calling code such as 86 or +44")
    ] = ""
    max_attempts: int = Field(default=8, ge=1, le=100)
    retry_backoff_s: Seconds = 30.0
    alertmanager_listen: ListenAddress | None = None
    alertmanager_token_file: Path | None = None
    # Who an ACK made with the token is recorded as (webhook:<name>); the request cannot choose.
    alertmanager_token_name: Name = "alertmanager"
    # Without a token the receiver refuses to start unless this is written (and config check warns).
    alertmanager_allow_unauthenticated: bool = False


class PagingSettings(Section):
    """The root keys paging owns."""

    contacts: list[ContactSection] = []
    channels: dict[Name, ChannelSettings] = {}
    paging: PagingSection = PagingSection()


class PagingConfig(Protocol):
    """What paging reads of the root config: its own sections and the appliance's name."""

    @property
    def appliance(self) -> ApplianceSection: ...
    @property
    def contacts(self) -> list[ContactSection]: ...
    @property
    def channels(self) -> Mapping[str, ChannelSettings]: ...
    @property
    def paging(self) -> PagingSection: ...


Config = PagingConfig  # the name this module's functions have always used for what they read


def problems(cfg: Config) -> list[str]:
    """Cross-references the schema cannot see, one line each, named by key path."""
    out: list[str] = []
    paging = cfg.paging
    names = [c.name for c in cfg.contacts]
    for name in {n for n in names if names.count(n) > 1}:
        out.append(f"contacts: the name {name!r} is used twice; rotations and policies name contacts")
    known = set(names)

    def contact(path: str, name: str) -> None:
        if name not in known:
            out.append(f"{path}: {name!r} is not a contact (known: {', '.join(sorted(known)) or 'none'})")

    def channel(path: str, name: str) -> None:
        if name not in cfg.channels:
            out.append(
                f"{path}: {name!r} is not a channel (known: {', '.join(sorted(cfg.channels)) or 'none'})"
            )

    for rname, rotation in paging.rotations.items():
        for i, who in enumerate(rotation.contacts):
            contact(f"paging.rotations.{rname}.contacts[{i}]", who)
    for i, override in enumerate(paging.overrides):
        if override.rotation not in paging.rotations:
            out.append(f"paging.overrides[{i}].rotation: {override.rotation!r} is not a rotation")
        contact(f"paging.overrides[{i}].contact", override.contact)
    for pname, policy in paging.policies.items():
        for s, stp in enumerate(policy.steps):
            for t, target in enumerate(stp.targets):
                path = f"paging.policies.{pname}.steps[{s}].targets[{t}]"
                if target.startswith(ROTATION_PREFIX):
                    if target[len(ROTATION_PREFIX) :] not in paging.rotations:
                        out.append(f"{path}: {target!r} names no rotation")
                else:
                    contact(path, target)
            for c, name in enumerate(stp.channels):
                channel(f"paging.policies.{pname}.steps[{s}].channels[{c}]", name)
    for i, name in enumerate(paging.channels):
        channel(f"paging.channels[{i}]", name)
    wanted = {paging.default_policy, *paging.severity_policies.values()}
    if paging.policies:
        for name in sorted(wanted - set(paging.policies)):
            out.append(f"paging: policy {name!r} is used but not defined under paging.policies")
    return out


def warnings(cfg: Config) -> list[str]:
    """Settings that are valid but will not do what they seem to say."""
    return [] if cfg.contacts else ["contacts: none configured; incidents will page nobody"]


def check(cfg: Config) -> None:
    found = problems(cfg)
    if found:
        raise ConfigError(f"{len(found)} problem(s) in the paging configuration", found)


def roster(cfg: Config) -> Roster:
    paging = cfg.paging
    night = None
    if paging.night is not None:
        sh, sm = (int(x) for x in paging.night.start.split(":"))
        eh, em = (int(x) for x in paging.night.end.split(":"))
        night = Night(sh * 60 + sm, eh * 60 + em, paging.night.timezone)
    return Roster(
        contacts={
            c.name: Contact(c.name, c.phone, c.email, c.company, tuple(c.skills), c.wake_for)
            for c in cfg.contacts
        },
        rotations={
            name: Rotation(name, tuple(r.contacts), r.start.timestamp(), r.period_s)
            for name, r in paging.rotations.items()
        },
        overrides=tuple(
            Override(o.rotation, o.contact, o.start.timestamp(), o.end.timestamp()) for o in paging.overrides
        ),
        policies={
            name: Policy(
                name,
                tuple(Step(tuple(s.targets), s.escalate_after_s, tuple(s.channels)) for s in p.steps),
                p.repeat,
            )
            for name, p in paging.policies.items()
        },
        default_policy=paging.default_policy,
        severity_policies={str(k): v for k, v in paging.severity_policies.items()},
        night=night,
        site=cfg.appliance.name,
        country_code=paging.country_code.lstrip("+"),
    )


def channel_order(cfg: Config) -> list[str]:
    return list(cfg.paging.channels) or list(cfg.channels)


def read_secret(path: Path | None, what: str) -> str | None:
    """A secret from its ``*_file`` (:func:`appliance.secretfile.read_secret`); None when not configured."""
    return None if path is None else secretfile.read_secret(path, what)


# Each builder imports its channel class itself: reading a config (every CLI command does) needs
# neither pyserial nor an HTTP client; only the daemon and the paging commands build channels.


def _gsm(name: str, ch: GsmChannelSettings, cfg: Config, hooks: dict[str, Any]) -> Channel:
    from appliance.paging.modem import GsmChannel

    return GsmChannel(
        name,
        ch.device,
        baud=ch.baud,
        pin=read_secret(ch.pin_file, f"channels.{name}.pin_file"),
        smsc=ch.smsc,
        send_timeout_s=ch.send_timeout_s,
        prompt_timeout_s=ch.prompt_timeout_s,
        retries=ch.retries,
        poll_s=ch.poll_s,
        health_s=ch.health_s,
        status_reports=ch.status_reports,
        **hooks,
    )


def _smtp(name: str, ch: SmtpChannelSettings, cfg: Config, hooks: dict[str, Any]) -> Channel:
    from appliance.paging.smtp import SmtpChannel

    return SmtpChannel(
        name,
        ch.host,
        ch.port,
        from_addr=ch.from_addr,
        starttls=ch.starttls,
        username=ch.username,
        password=read_secret(ch.password_file, f"channels.{name}.password_file"),
        ca_file=ch.ca_file,
        timeout_s=ch.timeout_s,
    )


def _webhook(name: str, ch: WebhookChannelSettings, cfg: Config, hooks: dict[str, Any]) -> Channel:
    from appliance.paging.webhook import WebhookChannel

    return WebhookChannel(
        name,
        ch.url,
        ch.format,
        secret=read_secret(ch.secret_file, f"channels.{name}.secret_file"),
        timeout_s=ch.timeout_s,
        retries=ch.retries,
        source=cfg.appliance.name,
    )


# The one table of channel types: ``[channels.<name>] type`` -> its builder. A new channel is its
# module, its settings class in the ChannelSettings union above, and one line here.
CHANNEL_BUILDERS: dict[str, Callable[[str, Any, Config, dict[str, Any]], Channel]] = {
    "gsm": _gsm,
    "smtp": _smtp,
    "webhook": _webhook,
}


def build_channels(cfg: Config, **gsm_hooks: Any) -> dict[str, Channel]:
    """One channel object per ``[channels.<name>]``; an unknown type names the known ones.

    ``gsm_hooks`` (the daemon's callbacks for inbound texts and modem health) go to GSM channels.
    """
    out: dict[str, Channel] = {}
    for name, ch in cfg.channels.items():
        builder = CHANNEL_BUILDERS.get(str(getattr(ch, "type", "")))
        if builder is None:  # the schema's discriminator already refuses unknown types
            raise ConfigError(f"channels.{name}.type: unknown (known: {', '.join(CHANNEL_BUILDERS)})")
        out[name] = builder(name, ch, cfg, gsm_hooks if isinstance(ch, GsmChannelSettings) else {})
    return out


Factory = Callable[[Config], dict[str, Channel]]
