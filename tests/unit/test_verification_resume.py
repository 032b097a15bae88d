"""Issue 20: the verification calls after a change survive a crash.

The engine keeps the calls it is owed (``EngineState.verifying``, written only by
``step``) from the runbook's success until their result; a restart that finds the
mark set asks for the calls again. Pure engine scenarios and hypothesis properties
under a simulated clock, then the service on a real SQLite store: one service is
stopped while its verifier is still calling, a second one on the same store places
the calls and reports them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import config
from appliance.clock import SimulatedClock
from appliance.store import Store
from failover import verification
from failover.actuators.base import NullActuator
from failover.engine import (
    CallsVerified,
    Command,
    EngineState,
    Event,
    Policy,
    PrimaryVerdict,
    Resumed,
    RunbookDone,
    RunRunbook,
    Tick,
    TookOver,
    VerifyCalls,
    WitnessVote,
    step,
)
from failover.service import FailoverService
from failover.thirdvote import NullVoter
from failover.verification import Expectation, HotlineCheck
from monitoring.probes.testcall import CallResult
from tests.unit.test_failover_service import settle
from tests.unit.test_verification import CONFIG, answered

VERIFYING = Policy(mode="confirm", hold_down_s=10, verify_by_calls=True)
FAILING_OVER = EngineState(state="failing_over", routing="failover", epoch=4, lost=("west",))


def test_a_successful_runbook_leaves_its_calls_owed_until_they_report() -> None:
    done = step(FAILING_OVER, RunbookDone("failover", 4, True, "failover", "ok", ("west",)), VERIFYING, 1.0)
    assert done.state.verifying == "failover" and done.state.state == "backup_active"
    assert VerifyCalls("failover", 4, ("west",)) in done.actions
    assert EngineState.from_json(done.state.to_json()).verifying == "failover"  # durable like the rest
    answered_ = step(done.state, CallsVerified("failover", 4, True, "95588 at backup"), VERIFYING, 2.0)
    assert answered_.state.verifying is None
    # Not verified is a result too: the calls are owed no more (the page says what failed).
    failed = step(done.state, CallsVerified("failover", 4, False, "95588 not answered"), VERIFYING, 2.0)
    assert failed.state.verifying is None
    stale = step(done.state, CallsVerified("failover", 3, True, "old"), VERIFYING, 2.0)
    assert stale.state.verifying == "failover"


def test_without_a_verifier_nothing_is_owed_and_a_failed_runbook_owes_nothing() -> None:
    plain = step(FAILING_OVER, RunbookDone("failover", 4, True, "failover", "ok"), Policy(), 1.0)
    assert plain.state.verifying is None and not any(isinstance(a, VerifyCalls) for a in plain.actions)
    failed = step(
        FAILING_OVER, RunbookDone("failover", 4, False, "normal", "carrier API 503"), VERIFYING, 1.0
    )
    assert failed.state.verifying is None and not any(isinstance(a, VerifyCalls) for a in failed.actions)


def test_a_restart_with_calls_owed_places_them_again() -> None:
    owed = EngineState(
        state="backup_active", routing="failover", epoch=4, lost=("west",), verifying="failover"
    )
    resumed = step(owed, Resumed(), VERIFYING, 100.0)
    assert resumed.actions == (VerifyCalls("failover", 4, ("west",)),)
    assert resumed.decision == (
        "resumed in backup_active with failover routing; placing the interrupted failover's"
        " verification calls again (epoch 4)"
    )
    assert resumed.state.verifying == "failover"  # still owed until the calls report
    # The world obeyed a newer token: the calls are placed at the epoch the engine continues from.
    above = step(owed, Resumed(world_token=9), VERIFYING, 100.0)
    assert above.actions == (VerifyCalls("failover", 9, ("west",)),) and above.state.epoch == 9
    # Verification turned off since: nothing can place the calls, the mark is dropped, and said so.
    off = step(owed, Resumed(), Policy(), 100.0)
    assert off.actions == () and off.state.verifying is None and "dropped" in off.decision
    failback = dataclasses.replace(
        owed, state="primary_active", routing="normal", lost=(), verifying="failback"
    )
    assert step(failback, Resumed(), VERIFYING, 100.0).actions == (VerifyCalls("failback", 4, ()),)


def test_a_newer_change_or_a_takeover_supersedes_the_owed_calls() -> None:
    owed = EngineState(
        state="failback_pending", routing="failover", epoch=4, primary="up", verifying="failover"
    )
    back = step(owed, Command("failback", "uid=0(root)"), VERIFYING, 10.0)
    assert back.state.state == "failing_back" and back.state.verifying is None
    taken = step(owed, TookOver("failover", 12, "failover"), VERIFYING, 10.0)
    assert taken.state.verifying is None


events = st.one_of(
    st.builds(PrimaryVerdict, st.sampled_from(["up", "down", "down", "unknown"])),
    st.builds(WitnessVote, st.sampled_from([True, False, None])),
    st.builds(Tick),
    st.builds(
        Command,
        st.sampled_from(["failover", "failback", "approve", "cancel", "maintenance_on", "maintenance_off"]),
        st.just("uid=0(root)"),
        st.just(""),
        st.booleans(),
    ),
    st.builds(Resumed),
    st.builds(Resumed, st.integers(0, 30)),
    st.builds(TookOver, st.sampled_from(["normal", "failover"]), st.integers(0, 30)),
    st.just("calls ok"),
    st.just("calls failed"),
    st.just("crash"),
)


@settings(max_examples=400)
@given(
    script=st.lists(st.tuples(st.floats(0, 30), events, st.booleans()), max_size=60),
    mode=st.sampled_from(["auto", "confirm", "manual"]),
)
def test_owed_calls_are_asked_for_until_they_report_whatever_crashes_between(
    script: list[tuple[float, Event | str, bool]], mode: str
) -> None:
    """Every successful change is judged by calls exactly when it is the change in force: the engine
    asks on success and on every restart until their result, never for a superseded change."""
    policy = Policy(mode=mode, has_witness=True, hold_down_s=10, min_dwell_s=20, verify_by_calls=True)  # type: ignore[arg-type]
    state, now = EngineState(), 0.0
    asked: VerifyCalls | None = None  # the calls asked for and not yet answered (lost at a crash)
    for gap, event, runbook_ok in script:
        now += gap
        if event == "crash":  # the daemon dies: in-flight calls are lost, the persisted state is not
            state, asked = EngineState.from_json(state.to_json()), None
            event = Resumed()
        elif event in ("calls ok", "calls failed"):
            if asked is None:
                continue
            event, asked = CallsVerified(asked.kind, asked.epoch, event == "calls ok", "summary"), None
        assert not isinstance(event, str)
        out = step(state, event, policy, now)
        state = out.state
        for action in out.actions:
            if isinstance(action, VerifyCalls):
                assert action.epoch == state.epoch and action.kind == state.verifying
                asked = action
            if isinstance(action, RunRunbook):
                outcome = RunbookDone(action.kind, action.epoch, runbook_ok,
                                      ("failover" if action.kind == "failover" else "normal") if runbook_ok else "unknown",
                                      "", action.lost)  # fmt: skip
                done = step(state, outcome, policy, now)
                state = done.state
                verify = [a for a in done.actions if isinstance(a, VerifyCalls)]
                assert bool(verify) == runbook_ok  # a success is always followed by its calls
                asked = verify[0] if verify else asked
        # What is owed is the change in force: its routing, never while a runbook runs.
        if state.verifying is not None:
            assert state.state not in ("failing_over", "failing_back")
            assert state.routing == ("failover" if state.verifying == "failover" else "normal")
        else:
            assert asked is None or asked.epoch != state.epoch  # nothing owed: nothing to answer
        # A restart now would ask for exactly what is owed.
        again = [a for a in step(state, Resumed(), policy, now).actions if isinstance(a, VerifyCalls)]
        assert [a.kind for a in again] == ([state.verifying] if state.verifying else [])


def test_a_service_stopped_mid_verification_places_the_calls_after_its_restart(tmp_path: Path) -> None:
    """One service's verifier never finishes (the daemon dies mid-call); a second on the same store
    places the owed calls at start-up and the verification is recorded for the report."""
    cfg = config.parse(CONFIG)
    clock = SimulatedClock()
    store = Store.open(tmp_path, clock=clock.time)
    asked: list[str] = []

    async def hanging(kind: str, lost: tuple[str, ...]) -> list[HotlineCheck]:
        asked.append(f"first {kind}")
        await asyncio.Event().wait()  # still calling when the daemon dies
        raise AssertionError("unreachable")

    async def answering(kind: str, lost: tuple[str, ...]) -> list[HotlineCheck]:
        asked.append(f"second {kind}")

        async def place(expected: Expectation) -> CallResult:
            return answered(expected.number, f"site:{expected.destination}")

        wanted = verification.expectations(cfg, "failover", lost)
        return await verification.verify(wanted, place, timeout_s=0.05, retry_s=0.01)

    async def first() -> None:
        service = FailoverService(cfg, store, clock, [NullActuator()], NullVoter(), verify_calls=hanging)
        task = asyncio.create_task(service.run())
        await settle(service)
        await service.ask(Command("failover", "uid=1000(tech)", "planned move", force=True))
        for _ in range(5):
            await settle(service)
        assert service.state.state == "backup_active" and service.state.verifying == "failover"
        task.cancel()  # the kill: no result, no CallsVerified
        await service.close()

    async def second() -> None:
        service = FailoverService(cfg, store, clock, [NullActuator()], NullVoter(), verify_calls=answering)
        task = asyncio.create_task(service.run())
        for _ in range(8):
            await settle(service)
        assert service.state.verifying is None
        assert service.state.last_decision.startswith("failover verified by calls (epoch 1): ")
        task.cancel()

    asyncio.run(first())
    assert not store.events(kind="failover.verification")
    asyncio.run(second())
    assert asked == ["first failover", "second failover"]
    (event,) = store.events(kind="failover.verification")
    assert event.data["ok"] and event.data["epoch"] == 1
    decisions = [e.message for e in store.events(kind="failover.decision")]
    assert any(
        "placing the interrupted failover's verification calls again (epoch 1)" in d for d in decisions
    )
    store.close()
