"""The runbook: ordered, verified, rolled back in reverse on failure, timed out when stuck."""

from __future__ import annotations

import asyncio

from failover import runbook
from failover.actuators.base import Actuator, ActuatorError, NullActuator
from failover.routing import Routing

NORMAL = Routing("normal", "primary", 1, {"95588": 1}, active_sets=frozenset({1}))
FAILOVER = Routing("failover", "backup", 2, {"95588": 2}, fenced_sets=frozenset({1}))


class Flaky(NullActuator):
    def __init__(
        self,
        name: str,
        *,
        fail_apply: bool = False,
        fail_rollback: bool = False,
        hang: bool = False,
        drift: bool = False,
        log: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.fail_apply, self.fail_rollback, self.hang, self.drift = fail_apply, fail_rollback, hang, drift
        self.log = log if log is not None else []

    async def apply(self, routing: Routing, token: int) -> None:
        self.log.append(f"{self.name} apply {routing.name}")
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail_apply:
            raise ActuatorError("kamailio answered 500")
        await super().apply(routing, token)

    async def rollback(self, previous: Routing, token: int) -> None:
        self.log.append(f"{self.name} rollback {previous.name}")
        if self.fail_rollback:
            raise ActuatorError("unreachable")
        await super().apply(previous, token)

    async def verify(self, routing: Routing) -> list[str]:
        return ["someone edited it"] if self.drift else await super().verify(routing)


def go(actuators: list[Actuator]) -> runbook.RunbookResult:
    return asyncio.run(runbook.run(FAILOVER, NORMAL, actuators, 7, step_timeout_s=0.2))


def test_all_steps_applied_and_verified_in_order() -> None:
    log: list[str] = []
    a, b = Flaky("kamailio", log=log), Flaky("hook", log=log)
    result = go([a, b])
    assert result.ok and result.routing == "failover"
    assert log == ["kamailio apply failover", "hook apply failover"]
    assert [s.to_json()["actuator"] for s in result.steps] == ["kamailio", "hook"]
    assert a.applied == [(FAILOVER, 7)]


def test_a_failed_step_rolls_back_everything_touched_in_reverse() -> None:
    log: list[str] = []
    result = go(
        [Flaky("kamailio", log=log), Flaky("netlink", log=log), Flaky("hook", fail_apply=True, log=log)]
    )
    assert not result.ok and result.routing == "normal"
    assert result.detail == "hook: kamailio answered 500"
    assert log == [
        "kamailio apply failover",
        "netlink apply failover",
        "hook apply failover",
        "hook rollback normal",
        "netlink rollback normal",
        "kamailio rollback normal",
    ]


def test_verify_mismatch_counts_as_failure() -> None:
    result = go([Flaky("kamailio", drift=True)])
    assert not result.ok and "verify: someone edited it" in result.detail


def test_a_hung_step_times_out_and_a_failed_rollback_leaves_routing_unknown() -> None:
    result = go([Flaky("kamailio", fail_rollback=True), Flaky("hook", hang=True)])
    assert not result.ok and result.routing == "unknown"
    assert result.detail == "hook: apply timed out after 0.2s; rollback failed"
    assert [(s.actuator, s.action, s.ok) for s in result.steps] == [
        ("kamailio", "apply", True),
        ("hook", "apply", False),
        ("hook", "rollback", True),
        ("kamailio", "rollback", False),
    ]
