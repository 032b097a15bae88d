"""Who is on call: contacts, weekly rotations with overrides, and night hours.

Pure functions of the roster and a unix time. Wall time (not monotonic) is the
right clock here: a rotation hands over at a time people agreed on, and
incidents outlive a reboot.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from zoneinfo import ZoneInfo

Severity = Literal["info", "warning", "error", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "error", "critical")
RANK: dict[str, int] = {s: i for i, s in enumerate(SEVERITIES)}
WEEK_S = 7 * 86400.0
ROTATION_PREFIX = "rotation:"


@dataclass(frozen=True, slots=True)
class Contact:
    name: str
    phone: str | None = None
    email: str | None = None
    company: str = ""
    skills: tuple[str, ...] = ()
    # At night this contact is woken only for incidents at least this severe;
    # lesser pages wait for the morning.
    wake_for: Severity = "critical"


@dataclass(frozen=True, slots=True)
class Rotation:
    """Contacts take turns of ``period_s`` seconds, the first turn starting at ``start``."""

    name: str
    contacts: tuple[str, ...]
    start: float
    period_s: float = WEEK_S


@dataclass(frozen=True, slots=True)
class Override:
    """``contact`` replaces the rotation's regular on-call for ``[start, end)``."""

    rotation: str
    contact: str
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Night:
    """Local night hours, e.g. 22:00 to 07:00 in Asia/Shanghai (may span midnight)."""

    start_minute: int
    end_minute: int
    tz: str = "UTC"

    def is_night(self, now: float) -> bool:
        local = dt.datetime.fromtimestamp(now, ZoneInfo(self.tz))
        minute = local.hour * 60 + local.minute
        if self.start_minute <= self.end_minute:
            return self.start_minute <= minute < self.end_minute
        return minute >= self.start_minute or minute < self.end_minute

    def ends_after(self, now: float) -> float:
        """The next end of the night after ``now`` (unix time)."""
        zone = ZoneInfo(self.tz)
        local = dt.datetime.fromtimestamp(now, zone)
        end = local.replace(hour=self.end_minute // 60, minute=self.end_minute % 60, second=0, microsecond=0)
        if end <= local:
            end += dt.timedelta(days=1)
        return end.timestamp()


@dataclass(frozen=True, slots=True)
class Step:
    """Page ``targets`` (contact names or ``rotation:<name>``), then wait ``escalate_after_s``."""

    targets: tuple[str, ...]
    escalate_after_s: float = 300.0
    channels: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Policy:
    """Steps in order; after the last one, start again ``repeat`` more times."""

    name: str
    steps: tuple[Step, ...]
    repeat: int = 0


@dataclass(frozen=True)
class Roster:
    """Everything the escalation core needs to know about people, from the config."""

    contacts: Mapping[str, Contact] = field(default_factory=dict)
    rotations: Mapping[str, Rotation] = field(default_factory=dict)
    overrides: tuple[Override, ...] = ()
    policies: Mapping[str, Policy] = field(default_factory=dict)
    default_policy: str = "default"
    severity_policies: Mapping[str, str] = field(default_factory=dict)
    night: Night | None = None
    site: str = "hotsite"
    country_code: str = ""  # paging.country_code: how a national number from the network is read

    def policy_for(self, severity: str, requested: str | None = None) -> Policy | None:
        name = requested or self.severity_policies.get(severity) or self.default_policy
        return self.policies.get(name)

    def by_phone(self, phone: str) -> Contact | None:
        """The contact with this number, in any of its forms (``normalise_phone``)."""
        wanted = phone_forms(phone, self.country_code)
        for contact in self.contacts.values():
            if contact.phone and normalise_phone(contact.phone, self.country_code) in wanted:
                return contact
        return None


def normalise_phone(phone: str, country_code: str = "") -> str:
    """E.164 where it can be known: '+86 138-0013-8000', '008613800138000' and, with country
    code 86, the national forms '13800138000' and '0138 0013 8000' all give '+8613800138000'.

    Without a country code a national number stays bare digits and matches nothing
    written in E.164 (the config's contacts are): set ``paging.country_code``.
    """
    raw = phone.strip()
    digits = "".join(ch for ch in raw if ch.isdigit())
    cc = country_code.lstrip("+")
    if raw.startswith("+"):
        return "+" + digits
    if digits.startswith("00"):
        return "+" + digits[2:]
    if cc:
        return "+" + cc + digits.lstrip("0")
    return digits


def phone_forms(phone: str, country_code: str = "") -> set[str]:
    """The E.164 numbers a sender's address may stand for: the normalised form and, for a
    number given without '+' that already starts with the country code, that number."""
    forms = {normalise_phone(phone, country_code)}
    digits = "".join(ch for ch in phone if ch.isdigit())
    cc = country_code.lstrip("+")
    if cc and digits.startswith(cc) and not phone.strip().startswith("+"):
        forms.add("+" + digits)
    return forms


def on_call(roster: Roster, rotation: str, now: float) -> str | None:
    """The contact on call in ``rotation`` at ``now`` (an override wins), or None."""
    rot = roster.rotations.get(rotation)
    if rot is None or not rot.contacts:
        return None
    for override in reversed(roster.overrides):  # the last override listed wins
        if override.rotation == rotation and override.start <= now < override.end:
            return override.contact
    turn = int((now - rot.start) // rot.period_s)
    return rot.contacts[turn % len(rot.contacts)]


def resolve_target(roster: Roster, target: str, now: float) -> tuple[str | None, str]:
    """A step target to (contact name or None, why this contact)."""
    if target.startswith(ROTATION_PREFIX):
        name = target[len(ROTATION_PREFIX) :]
        who = on_call(roster, name, now)
        overridden = any(
            o.rotation == name and o.start <= now < o.end and o.contact == who for o in roster.overrides
        )
        return who, f"on call in rotation {name}" + (" (override)" if overridden else "")
    if target in roster.contacts:
        return target, "named in the policy"
    return None, f"unknown target {target!r}"


def schedule(roster: Roster, now: float, turns: int = 4) -> list[dict[str, object]]:
    """For ``hotsite oncall``: each rotation's current on-call and the next handovers."""
    out: list[dict[str, object]] = []
    for name, rot in roster.rotations.items():
        turn = int((now - rot.start) // rot.period_s)
        upcoming = []
        for k in range(1, turns + 1):
            at = rot.start + (turn + k) * rot.period_s
            upcoming.append({"from": at, "contact": rot.contacts[(turn + k) % len(rot.contacts)]})
        overrides = [
            {"contact": o.contact, "start": o.start, "end": o.end}
            for o in roster.overrides
            if o.rotation == name and o.end > now
        ]
        out.append(
            {
                "rotation": name,
                "on_call": on_call(roster, name, now),
                "until": rot.start + (turn + 1) * rot.period_s,
                "next": upcoming,
                "overrides": overrides,
            }
        )
    return out
