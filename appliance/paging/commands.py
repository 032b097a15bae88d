"""What a contractor may text back, parsed, and who may acknowledge what. Pure, so every
spelling and every rule is a table test.

The rules for an acknowledgement by SMS (issue 16): a text is the only credential a
phone has, and incident numbers are sequential and guessable, so

- the incident's 4-digit short code is required: ``ACK 4821``, ``4821``, or the
  number and the code together (``ACK 8 4821``, both must match); a bare ``ACK 8``
  acknowledges nothing;
- only a contact who was paged for the incident, or who is on call now in a
  rotation its escalation policy pages, may acknowledge it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from appliance.paging.incidents import Incident, PagerState
from appliance.paging.oncall import ROTATION_PREFIX, Contact, Roster, resolve_target

_ACK = re.compile(
    r"^\s*(?:ACK|ACKNOWLEDGE|OK|ACCEPT|确认|收到)\s*[:#]?\s*#?\s*([0-9]{1,6})\b(?:\s*[,/:]?\s*#?([0-9]{4})\b)?",
    re.IGNORECASE,
)
_BARE = re.compile(r"^\s*#?([0-9]{1,6})(?:\s*[,/:]?\s*#?([0-9]{4}))?\s*$")
_STATUS = re.compile(r"^\s*(?:STATUS|STAT|STATE|状态|\?)\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Command:
    """``ref``: the one number given (taken as a short code); ``number``: the incident number
    when both were given (``ACK 8 4821`` -> number "8", ref "4821")."""

    verb: Literal["ack", "status", "unknown"]
    ref: str = ""
    number: str = ""


def parse(text: str) -> Command:
    """``ACK 4821`` / ``ack#4821`` / ``4821`` / ``ACK 8 4821`` -> ack; ``STATUS`` -> status."""
    text = text.strip().replace("\u3000", " ")
    for pattern in (_ACK, _BARE):
        if match := pattern.match(text):
            first, code = match.group(1), match.group(2)
            return Command("ack", code, first) if code else Command("ack", first)
    if _STATUS.match(text):
        return Command("status")
    return Command("unknown")


def authorise_ack(
    state: PagerState, roster: Roster, contact: Contact, command: Command, now: float
) -> tuple[Incident | None, str]:
    """The incident ``contact`` may acknowledge with ``command``, or None and why not."""
    incident = next((i for i in state.incidents.values() if i.short_code == command.ref), None)
    if incident is None:
        if command.number == "" and command.ref.isdigit() and int(command.ref) in state.incidents:
            return None, f"reply with the incident's 4-digit code (ACK #{command.ref} <code>)"
        return None, f"no open incident has the code {command.ref}"
    if command.number and command.number.lstrip("#") != str(incident.id):
        return None, f"code {command.ref} is not the code of incident #{command.number}"
    if contact.name in incident.paged or contact.name == incident.acked_by:
        return incident, "paged for it"
    if on_call_for(roster, incident, contact.name, now):
        return incident, "on call for it"
    return None, f"you were not paged for #{incident.id} and are not on call for it"


def on_call_for(roster: Roster, incident: Incident, name: str, now: float) -> bool:
    """Is ``name`` on call now in a rotation that the incident's policy pages?"""
    policy = roster.policies.get(incident.policy)
    if policy is None:
        return False
    for step in policy.steps:
        for target in step.targets:
            if target.startswith(ROTATION_PREFIX) and resolve_target(roster, target, now)[0] == name:
                return True
    return False


HELP = (
    "hotsite: reply ACK <code> (the 4-digit code in the page) to acknowledge, or STATUS for the site's state."
)
