"""What a contractor may text back, parsed. Pure, so every spelling is a table test."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_ACK = re.compile(r"^\s*(?:ACK|ACKNOWLEDGE|OK|ACCEPT|确认|收到)\s*[:#]?\s*#?\s*([0-9]{1,6})\b", re.IGNORECASE)
_BARE = re.compile(r"^\s*#?([0-9]{1,6})\s*$")
_STATUS = re.compile(r"^\s*(?:STATUS|STAT|STATE|状态|\?)\s*$", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Command:
    verb: Literal["ack", "status", "unknown"]
    ref: str = ""


def parse(text: str) -> Command:
    """``ACK 42`` / ``ack#42`` / ``42`` / the 4-digit short code -> ack; ``STATUS`` -> status."""
    text = text.strip().replace("\u3000", " ")
    if match := _ACK.match(text):
        return Command("ack", match.group(1))
    if match := _BARE.match(text):
        return Command("ack", match.group(1))
    if _STATUS.match(text):
        return Command("status")
    return Command("unknown")


HELP = "hotsite: reply ACK <number> to acknowledge, or STATUS for the site's state."
