"""The health model: turns probe observations into a judged state per target.

Pure: ``observe(health, result) -> health`` takes the previous state and one
observation and returns the new state; nothing here reads a clock or does
I/O, so every judgement is reproducible under a simulated clock.

A target starts ``unknown``. It becomes ``up`` after ``rise`` consecutive
successes and ``down`` after ``fall`` consecutive failures, as HAProxy and
Kamailio's dispatcher do: one lost packet must never move a bank's phone lines.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from monitoring.probes.base import ProbeResult

State = Literal["unknown", "up", "down"]


@dataclass(frozen=True, slots=True)
class Thresholds:
    rise: int = 2
    fall: int = 3

    def __post_init__(self) -> None:
        if self.rise < 1:
            raise ValueError(f"rise must be >= 1, got {self.rise}")
        if self.fall < 1:
            raise ValueError(f"fall must be >= 1, got {self.fall}")


@dataclass(frozen=True, slots=True)
class TargetHealth:
    """What the appliance believes about one target, and why."""

    target: str
    state: State = "unknown"
    since: float | None = None  # when ``state`` was entered (monotonic seconds)
    successes: int = 0  # consecutive
    failures: int = 0  # consecutive
    last: ProbeResult | None = None
    transitions: int = 0

    @property
    def reason(self) -> str:
        """A short human reason for the current state."""
        if self.last is None:
            return "not probed yet"
        if self.last.ok:
            return f"{self.successes} consecutive successes"
        detail = f" ({self.last.detail})" if self.last.detail else ""
        return f"{self.failures} consecutive failures: {self.last.reason}{detail}"


def observe(health: TargetHealth, result: ProbeResult, thresholds: Thresholds) -> TargetHealth:
    """Fold one probe result into the target's health."""
    if result.target != health.target:
        raise ValueError(f"result for {result.target!r} given to the health of {health.target!r}")
    if result.ok:
        successes, failures = health.successes + 1, 0
    else:
        successes, failures = 0, health.failures + 1
    state = health.state
    if successes >= thresholds.rise:
        state = "up"
    elif failures >= thresholds.fall:
        state = "down"
    changed = state != health.state
    return dataclasses.replace(
        health,
        state=state,
        since=result.at if changed or health.since is None else health.since,
        successes=successes,
        failures=failures,
        last=result,
        transitions=health.transitions + (1 if changed else 0),
    )
