"""The failover service with a real store, the Null actuator and a simulated clock."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from appliance import config
from appliance.clock import SimulatedClock
from appliance.store import Store
from failover.actuators.base import ActuatorError, NullActuator
from failover.engine import Command, PrimaryVerdict, Tick
from failover.service import STATE_KEY, FailoverService
from failover.thirdvote import NullVoter
from tests.support import configs

CONFIG = (
    configs.SEATED_SITES
    + configs.hotline("vip", "95588", agents=40, failover=["backup", "ivr"])
    + configs.CONFIRM_FAILOVER
)


async def settle(service: FailoverService) -> None:
    for _ in range(50):
        await asyncio.sleep(0.01)
        if service.idle:
            return


def test_confirm_approve_runbook_and_resume_after_restart(tmp_path: Path) -> None:
    cfg = config.parse(CONFIG)
    clock = SimulatedClock()
    store = Store.open(tmp_path, clock=clock.time)
    actuator = NullActuator()

    async def scenario() -> None:
        service = FailoverService(cfg, store, clock, [actuator], NullVoter())
        task = asyncio.create_task(service.run())
        service.submit(PrimaryVerdict("down", "sbc and http down"))
        await settle(service)
        assert service.state.state == "primary_degraded"
        clock.advance(11)
        service.submit(Tick())
        await settle(service)
        assert service.state.state == "failover_pending"
        outcome = await service.ask(Command("approve", "uid=1000(tech)", "site manager agreed"))
        assert (
            outcome.decision == "starting failover (epoch 1) by uid=1000(tech): approved: site manager agreed"
        )
        await settle(service)
        assert service.state.state == "backup_active" and service.state.routing == "failover"
        routing, token = actuator.applied[-1]
        assert (routing.hotlines, routing.fenced_uris, token) == ({"95588": 2}, {"sip:10.0.0.1:5060"}, 1)
        refused = await service.ask(Command("failback", "uid=1000(tech)"))
        assert refused.refused and refused.decision.startswith("refused: the primary is judged down")
        task.cancel()

    asyncio.run(scenario())
    assert store.get_state(STATE_KEY)["state"] == "backup_active"
    kinds = [e.kind for e in store.events(limit=100)]
    assert "failover.runbook.failover.done" in kinds and kinds.count("failover.decision") >= 4
    approve = next(e for e in store.events(kind="failover.decision") if "approved" in e.message)
    assert approve.actor == "uid=1000(tech)"

    async def restarted() -> None:
        service = FailoverService(cfg, store, clock, [actuator], NullVoter())
        task = asyncio.create_task(service.run())
        await settle(service)
        assert service.state.state == "backup_active" and service.state.epoch == 1
        assert service.view()["plan"]["hotlines"] == {"95588": 2}
        task.cancel()

    asyncio.run(restarted())
    store.close()


def test_reconcile_repairs_drift(tmp_path: Path) -> None:
    cfg = config.parse(CONFIG)
    clock = SimulatedClock()
    store = Store.open(tmp_path, clock=clock.time)
    actuator = NullActuator()

    async def scenario() -> None:
        service = FailoverService(cfg, store, clock, [actuator], NullVoter())
        assert await service.reconcile_once() == ["null"]  # nothing applied yet: drift from normal
        assert actuator.applied[-1][0].name == "normal"
        assert await service.reconcile_once() == []

    asyncio.run(scenario())
    assert [e.kind for e in store.events(kind="failover.drift")][:2] == [
        "failover.drift.repaired",
        "failover.drift",
    ]
    store.close()


def test_reconcile_leaves_a_drill_alone(tmp_path: Path) -> None:
    """A drill routes its test number for a few seconds on purpose (its calls through the backup path);
    reconcile 'repairing' that drift removed the number mid-call and failed the drill."""
    cfg = config.parse(CONFIG)
    clock = SimulatedClock()
    store = Store.open(tmp_path, clock=clock.time)
    actuator = NullActuator()

    async def scenario() -> None:
        service = FailoverService(cfg, store, clock, [actuator], NullVoter())
        service.state = dataclasses.replace(service.state, state="drill")
        assert await service.reconcile_once() == [] and actuator.applied == []

    asyncio.run(scenario())
    store.close()


def test_a_lost_state_continues_above_the_token_the_world_has_obeyed(tmp_path: Path) -> None:
    """State lost (disk replaced, reinstalled) or restored from an older copy: the routing world
    still refuses every token below the newest it obeyed. Starting again at epoch 1 would have every
    later failover refused as stale; the daemon reads the world's token first and goes on above it."""
    cfg = config.parse(CONFIG)
    clock = SimulatedClock()
    store = Store.open(tmp_path, clock=clock.time)  # a fresh state: epoch 0
    actuator = NullActuator()
    actuator.highest_token = 3  # what a former life of this appliance left in the world

    async def scenario() -> None:
        service = FailoverService(cfg, store, clock, [actuator], NullVoter())
        task = asyncio.create_task(service.run())
        await settle(service)
        assert service.state.epoch == 3
        outcome = await service.ask(Command("failover", "uid=1000(tech)", "planned", force=True))
        assert outcome.decision.startswith("starting failover (epoch 4)"), outcome.decision
        await settle(service)
        assert service.state.state == "backup_active", service.last_runbook
        assert actuator.applied[-1][1] == 4
        task.cancel()

    asyncio.run(scenario())
    adopted = [e for e in store.events(kind="failover.decision") if "obeyed token 3" in e.message]
    assert adopted, [e.message for e in store.events(kind="failover.decision")]
    store.close()


def test_an_unreadable_world_token_leaves_the_epoch_and_says_so(tmp_path: Path, caplog: Any) -> None:
    cfg = config.parse(CONFIG)
    clock = SimulatedClock()
    store = Store.open(tmp_path, clock=clock.time)

    class Unreadable(NullActuator):
        async def obeyed_token(self) -> int | None:
            raise ActuatorError("null: read token: connection refused")

    async def scenario() -> None:
        service = FailoverService(cfg, store, clock, [Unreadable()], NullVoter())
        task = asyncio.create_task(service.run())
        await settle(service)
        assert service.state.epoch == 0
        task.cancel()

    asyncio.run(scenario())
    assert "could not read the token the routing world has obeyed" in caplog.text
    store.close()
