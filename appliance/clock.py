"""The one clock.

Decisions take ``now`` as an argument; only the edges read the clock, through
this interface, so tests drive time with :class:`SimulatedClock` instead of
sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds for intervals and timeouts; never jumps."""
        ...

    def time(self) -> float:
        """Unix time for records people read; may jump (NTP)."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


class SimulatedClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1_000.0, wall_offset: float = 1_800_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_offset

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go backwards (advance by {seconds})")
        self._now += seconds
