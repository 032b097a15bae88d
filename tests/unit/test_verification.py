"""Issue 20: every routing change verified by calls. The pure parts (what each hotline must prove, how a
call is judged, the bounded retry) with scripted calls and a simulated clock; the engine's decision and
page; the service running the calls after a real runbook with the Null actuator."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance import config
from appliance.clock import SimulatedClock
from appliance.store import Store
from failover import verification
from failover.actuators.base import NullActuator
from failover.engine import CallsVerified, Command, EngineState, Page, Policy, Resolve, step
from failover.service import FailoverService
from failover.thirdvote import NullVoter
from failover.verification import Expectation, HotlineCheck
from monitoring.probes.testcall import CallResult
from tests.support import configs
from tests.unit.test_failover_service import settle

CONFIG = (
    configs.SEATED_SITES
    + configs.hotline("vip", "95588", agents=40, priority=1, failover=["backup", "ivr"])
    + configs.hotline("cards", "95566", agents=40, priority=2, failover=["backup", "ivr"])
    + configs.hotline("quiet", "95500", agents=1, priority=3, failover=["backup"])
    + '[kamailio]\nsip = "10.0.2.1:5060"\n[testcalls]\nhotlines = ["cards", "vip"]\n'
    + configs.CONFIRM_FAILOVER
)


def answered(number: str, by: str, pdd_ms: float = 4.0, mos: float = 4.41) -> CallResult:
    return CallResult("verify", number, ok=True, reason="ok", code=200, status="200 OK",
                      pdd_answer_ms=pdd_ms, answered_by=by, mos=mos, audio=True, elapsed_s=3.2)  # fmt: skip


def rejected(number: str, code: int = 503, status: str = "503 Service Unavailable") -> CallResult:
    return CallResult("verify", number, ok=False, reason="rejected", code=code, status=status, elapsed_s=0.01)


def test_expectations_follow_the_plan_in_priority_order_for_listed_hotlines_only() -> None:
    cfg = config.parse(CONFIG)
    after_failover = verification.expectations(cfg, "failover")
    # vip takes 40 of the backup's 50 seats; cards no longer fits and goes to the IVR.
    assert [(e.hotline, e.destination, e.answered_by) for e in after_failover] == [
        ("vip", "backup", "site:backup"),
        ("cards", "ivr", None),  # an IVR's answer cannot be named: any answer with audio proves it
    ]
    after_failback = verification.expectations(cfg, "failback")
    assert [(e.number, e.answered_by) for e in after_failback] == [
        ("95588", "site:primary"),
        ("95566", "site:primary"),
    ]


def test_a_call_proves_a_hotline_only_if_answered_with_audio_where_the_plan_says() -> None:
    vip = Expectation("vip", "95588", "backup", "site:backup")
    assert verification.judge(vip, answered("95588", "site:backup")) == (
        True,
        "95588 at backup (PDD 4 ms, MOS 4.41)",
    )
    assert verification.judge(vip, answered("95588", "site:primary")) == (
        False,
        "95588 answered by site:primary, not at backup",
    )
    assert verification.judge(vip, rejected("95588")) == (
        False,
        "95588 not answered at backup: 503 Service Unavailable",
    )
    silent = CallResult("verify", "95588", ok=False, reason="no_audio", code=200, answered_by="site:backup")
    assert verification.judge(vip, silent) == (
        False,
        "95588 not answered at backup: no audio (0 RTP packets received)",
    )


def _run(
    wanted: list[Expectation], script: dict[str, list[CallResult]], timeout_s: float
) -> tuple[list[HotlineCheck], list[tuple[str, float]]]:
    clock = SimulatedClock()
    t0 = clock.time()
    placed: list[tuple[str, float]] = []  # (number, seconds since the verification started)

    async def place(expected: Expectation) -> CallResult:
        placed.append((expected.number, clock.time() - t0))
        queue = script[expected.number]
        result = queue.pop(0) if len(queue) > 1 else queue[0]
        clock.advance(result.elapsed_s)  # the call takes its own time
        return result

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)

    checks = asyncio.run(
        verification.verify(
            wanted, place, timeout_s=timeout_s, clock=clock.time, wall=lambda: clock.time() - t0, sleep=sleep
        )
    )
    return checks, placed


def test_a_transient_failure_is_called_again_and_the_first_good_call_is_reported() -> None:
    vip = Expectation("vip", "95588", "backup", "site:backup")
    checks, placed = _run([vip], {"95588": [rejected("95588"), answered("95588", "site:backup")]}, 60)
    (check,) = checks
    assert check.ok and check.attempts == 2 and len(placed) == 2
    assert check.answered_at == pytest.approx(placed[1][1] + 0.004, abs=1e-3)  # the second call's start + PDD
    assert check.to_json()["pdd_ms"] == 4.0 and check.to_json()["mos"] == 4.41


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(st.booleans(), min_size=1, max_size=40), min_size=1, max_size=4),
    st.floats(min_value=5, max_value=120),
)
def test_every_hotline_is_called_at_least_once_and_no_retry_starts_past_the_bound(
    outcomes: list[list[bool]], timeout_s: float
) -> None:
    wanted = [Expectation(f"h{i}", f"955{i:02d}", "backup", "site:backup") for i in range(len(outcomes))]
    script = {
        e.number: [answered(e.number, "site:backup") if good else rejected(e.number) for good in results]
        for e, results in zip(wanted, outcomes, strict=True)
    }
    checks, placed = _run(wanted, script, timeout_s)
    assert [c.expectation for c in checks] == wanted  # in order, each judged
    for e, check, results in zip(wanted, checks, outcomes, strict=True):
        calls = [at for number, at in placed if number == e.number]
        assert len(calls) == check.attempts >= 1
        assert all(at < timeout_s for at in calls[1:]), "a retry started after the bound"
        first_good = next((i for i, good in enumerate(results) if good), None)
        if check.ok:  # it stopped at the first good call
            assert first_good is not None and check.attempts <= first_good + 1
    assert verification.summary(checks).startswith(
        next((c.detail for c in checks if not c.ok), checks[0].detail)
    )


def test_the_engine_pages_a_change_the_calls_do_not_verify_and_ignores_stale_results() -> None:
    state = EngineState(state="backup_active", routing="failover", epoch=3, since=0.0)
    policy = Policy()
    failed = step(
        state, CallsVerified("failover", 3, False, "95566 not answered at backup: 503"), policy, 10.0
    )
    assert failed.decision == "failover NOT verified by calls (epoch 3): 95566 not answered at backup: 503"
    assert failed.actions == (
        Page("verification", "critical", "Failover NOT verified by calls: 95566 not answered at backup: 503"),
    )
    assert (failed.state.state, failed.state.routing) == (
        "backup_active",
        "failover",
    )  # calls never move routing
    good = step(
        state, CallsVerified("failover", 3, True, "95588 at backup (PDD 4 ms, MOS 4.41)"), policy, 10.0
    )
    assert good.decision.startswith("failover verified by calls (epoch 3)")
    assert isinstance(good.actions[0], Resolve) and good.actions[0].key == "verification"
    stale = step(state, CallsVerified("failover", 2, False, "old"), policy, 10.0)
    assert stale.actions == () and "stale" in stale.decision


def test_the_service_verifies_a_failover_by_calls_and_records_each_hotline(tmp_path: Path) -> None:
    cfg = config.parse(CONFIG)
    clock = SimulatedClock()
    store = Store.open(tmp_path, clock=clock.time)
    asked: list[tuple[str, tuple[str, ...]]] = []

    async def verifier(kind: str, lost: tuple[str, ...]) -> list[HotlineCheck]:
        asked.append((kind, lost))
        wanted = verification.expectations(cfg, "failover", lost)
        script = {"95588": answered("95588", "site:backup"), "95566": rejected("95566")}

        async def place(expected: Expectation) -> CallResult:
            return script[expected.number]

        return await verification.verify(wanted, place, timeout_s=0.05, retry_s=0.01)

    async def scenario() -> None:
        service = FailoverService(cfg, store, clock, [NullActuator()], NullVoter(), verify_calls=verifier)
        task = asyncio.create_task(service.run())
        await settle(service)
        await service.ask(Command("failover", "uid=1000(tech)", "drill of the real thing", force=True))
        for _ in range(5):
            await settle(service)
        assert service.state.state == "backup_active"
        assert service.state.last_decision == (
            "failover NOT verified by calls (epoch 1): 95566 not answered at ivr: 503 Service Unavailable;"
            " 95588 at backup (PDD 4 ms, MOS 4.41)"
        )
        task.cancel()

    asyncio.run(scenario())
    assert asked == [("failover", ())]
    (event,) = store.events(kind="failover.verification")
    assert event.message.startswith("failover NOT verified by calls: 95566 not answered at ivr")
    by_hotline = {h["hotline"]: h for h in event.data["hotlines"]}
    assert by_hotline["vip"]["ok"] and by_hotline["vip"]["answered_by"] == "site:backup"
    assert not by_hotline["cards"]["ok"] and by_hotline["cards"]["code"] == 503
    store.close()
