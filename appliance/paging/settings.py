"""From the config file to the paging core's :class:`Roster` and the channel objects.

The schema (``appliance.config.PagingSection``) checks each key; :func:`problems`
checks what no single key can: that rotations, overrides and policies name
contacts, rotations and channels that exist.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance import config as config_mod
from appliance import secretfile
from appliance.config import Config
from appliance.errors import ConfigError
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


def build_channels(cfg: Config, **gsm_hooks: Any) -> dict[str, Channel]:
    """One channel object per ``[channels.<name>]``; an unknown type names the known ones."""
    from appliance.paging.modem import GsmChannel
    from appliance.paging.smtp import SmtpChannel
    from appliance.paging.webhook import WebhookChannel

    out: dict[str, Channel] = {}
    for name, ch in cfg.channels.items():
        if isinstance(ch, config_mod.GsmChannel):
            out[name] = GsmChannel(
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
                **gsm_hooks,
            )
        elif isinstance(ch, config_mod.SmtpChannel):
            out[name] = SmtpChannel(
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
        elif isinstance(ch, config_mod.WebhookChannel):
            out[name] = WebhookChannel(
                name,
                ch.url,
                ch.format,
                secret=read_secret(ch.secret_file, f"channels.{name}.secret_file"),
                timeout_s=ch.timeout_s,
                retries=ch.retries,
                source=cfg.appliance.name,
            )
        else:  # pragma: no cover - the schema's discriminator already refuses unknown types
            raise ConfigError(f"channels.{name}.type: unknown (known: gsm, smtp, webhook)")
    return out


Factory = Callable[[Config], dict[str, Channel]]
