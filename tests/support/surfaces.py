"""Checks on what people see, shared by the unit and the lab tests (issue 19)."""

from __future__ import annotations

import re

BOX = set("┏━┃│┓┗┛┡┩└┘─╇╈┼├┤┬┴═║╭╮╯╰")

# A number standing alone (not part of an address, a version, a time of day, a date or a phone number).
NUMBER = re.compile(r"(?<![\w.:/+-])(\d{3,}(?:\.\d+)?)(?![\w.:/-])")


def monotonic_leaks(text: str, low: float, high: float) -> list[str]:
    """The lines of *text* showing a number within [low, high]: the band of ``time.monotonic()``
    readings taken while the daemon ran, which is what "down since 1710.5" was."""
    return [line for line in text.splitlines() if any(low <= float(n) <= high for n in NUMBER.findall(line))]
