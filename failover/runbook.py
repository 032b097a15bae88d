"""The runbook: apply a routing through every actuator, in order, verified, or roll back.

Each step is one actuator: apply, then read back (verify). A step that
fails, times out or does not verify stops the runbook, and every step
already touched is rolled back to the previous routing, in reverse order,
and verified again. The result says which routing is left in place:
the target (success), the previous one (rolled back), or ``unknown`` when
a rollback failed too, which the engine turns into "held" and a page.

Every step's duration is recorded, for the incident report and the RTO
figures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.logs import kv
from failover.actuators.base import Actuator, ActuatorError
from failover.routing import Routing

log = logging.getLogger(f"hotsite.{__name__}")


@dataclass(frozen=True, slots=True)
class StepRecord:
    actuator: str
    action: str  # apply | rollback
    ok: bool
    duration_s: float
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "actuator": self.actuator,
            "action": self.action,
            "ok": self.ok,
            "duration_s": round(self.duration_s, 4),
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class RunbookResult:
    ok: bool
    routing: str  # the routing left in place: target.name, previous.name or "unknown"
    detail: str
    steps: tuple[StepRecord, ...] = field(default_factory=tuple)
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "routing": self.routing,
            "detail": self.detail,
            "duration_s": round(self.duration_s, 4),
            "steps": [s.to_json() for s in self.steps],
        }


async def run(
    target: Routing,
    previous: Routing,
    actuators: Sequence[Actuator],
    token: int,
    *,
    step_timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> RunbookResult:
    started = clock()
    steps: list[StepRecord] = []
    touched: list[Actuator] = []
    for actuator in actuators:
        touched.append(actuator)
        record = await _step(actuator, "apply", target, token, step_timeout_s, clock)
        steps.append(record)
        if not record.ok:
            rolled_back = await _roll_back(touched, previous, token, step_timeout_s, clock, steps)
            left = previous.name if rolled_back else "unknown"
            # Actuator errors usually name the actuator already ("redirect: … exited 1").
            named = (
                record.detail
                if record.detail.startswith(f"{actuator.name}: ")
                else f"{actuator.name}: {record.detail}"
            )
            detail = named + ("" if rolled_back else "; rollback failed")
            return RunbookResult(False, left, detail, tuple(steps), clock() - started)
    applied = ", ".join(a.name for a in actuators) or "no actuators"
    return RunbookResult(
        True,
        target.name,
        f"{target.name} routing applied and verified ({applied})",
        tuple(steps),
        clock() - started,
    )


async def _step(
    actuator: Actuator, action: str, routing: Routing, token: int, timeout: float, clock: Callable[[], float]
) -> StepRecord:
    started = clock()
    try:
        async with asyncio.timeout(timeout):
            if action == "apply":
                await actuator.apply(routing, token)
            else:
                await actuator.rollback(routing, token)
            differences = await actuator.verify(routing)
    except TimeoutError:
        return _record(actuator, action, False, clock() - started, f"{action} timed out after {timeout:g}s")
    except ActuatorError as exc:
        return _record(actuator, action, False, clock() - started, exc.message)
    if differences:
        return _record(actuator, action, False, clock() - started, "verify: " + "; ".join(differences))
    return _record(actuator, action, True, clock() - started, f"{routing.name} verified")


def _record(actuator: Actuator, action: str, ok: bool, duration: float, detail: str) -> StepRecord:
    log.info(
        f"runbook step {actuator.name} {action}: {'ok' if ok else 'FAILED'}",
        extra=kv(actuator=actuator.name, action=action, ok=ok, duration_s=round(duration, 4), detail=detail),
    )
    return StepRecord(actuator.name, action, ok, duration, detail)


async def _roll_back(
    touched: list[Actuator],
    previous: Routing,
    token: int,
    timeout: float,
    clock: Callable[[], float],
    steps: list[StepRecord],
) -> bool:
    all_ok = True
    for actuator in reversed(touched):
        record = await _step(actuator, "rollback", previous, token, timeout, clock)
        steps.append(record)
        all_ok = all_ok and record.ok
    return all_ok
