"""The failover engine, driven by events and a simulated clock: scenarios and properties."""

from __future__ import annotations

import dataclasses
from typing import Literal

from hypothesis import example, given, settings
from hypothesis import strategies as st

from failover.engine import (
    BackupVerdict,
    Command,
    DrillDone,
    EngineState,
    Event,
    Outcome,
    Page,
    Policy,
    PrimaryVerdict,
    Resolve,
    Resumed,
    RunbookDone,
    RunDrill,
    RunRunbook,
    Tick,
    WitnessVote,
    step,
)

Mode = Literal["auto", "confirm", "manual"]  # Policy.mode

AUTO = Policy(mode="auto", has_witness=True, hold_down_s=10, min_dwell_s=60, max_auto_per_hour=1)
CONFIRM = Policy(mode="confirm", hold_down_s=10)


class Run:
    """Feeds events at given times and keeps every outcome."""

    def __init__(self, policy: Policy, state: EngineState | None = None) -> None:
        self.policy = policy
        self.state = state or EngineState()
        self.outcomes: list[Outcome] = []

    def at(self, now: float, event: Event) -> Outcome:
        outcome = step(self.state, event, self.policy, now)
        self.state = outcome.state
        self.outcomes.append(outcome)
        return outcome

    def runbooks(self) -> list[RunRunbook]:
        return [a for o in self.outcomes for a in o.actions if isinstance(a, RunRunbook)]


def test_a_blip_shorter_than_hold_down_moves_nothing() -> None:
    run = Run(AUTO)
    run.at(0, WitnessVote(False))
    assert run.at(1, PrimaryVerdict("down")).decision.startswith("primary judged down; holding down 10s")
    assert run.state.state == "primary_degraded"
    run.at(5, Tick())
    out = run.at(6, PrimaryVerdict("up"))
    assert out.decision == "primary is up again after 5s: a blip, no action"
    assert run.state.state == "primary_active" and run.runbooks() == []
    assert any(isinstance(a, Resolve) for a in out.actions)


def test_auto_failover_needs_hold_down_and_the_witness() -> None:
    run = Run(AUTO)
    run.at(0, PrimaryVerdict("down"))
    run.at(0, WitnessVote(True, "sees SBC"))
    out = run.at(11, Tick())
    assert (
        out.decision == "primary unreachable from here but the witness sees it: a partition, not failing over"
    )
    assert run.state.state == "primary_degraded"
    out = run.at(12, WitnessVote(False, "lost it too"))  # every event re-evaluates: no wait for a tick
    assert (
        out.decision == "starting failover (epoch 1) by daemon: primary down for 12s and the witness agrees"
    )
    assert run.runbooks() == [
        RunRunbook("failover", 1, "primary down for 12s and the witness agrees", "daemon")
    ]
    assert run.state.state == "failing_over" and run.state.routing == "failover"
    out = run.at(13, RunbookDone("failover", 1, True, "failover", "5 hotlines moved"))
    assert run.state.state == "backup_active"
    assert out.decision == "failover completed (epoch 1): 5 hotlines moved"


def test_without_witness_auto_degrades_to_confirm() -> None:
    run = Run(dataclasses.replace(AUTO, has_witness=False))
    run.at(0, PrimaryVerdict("down"))
    out = run.at(10, Tick())
    assert run.state.state == "failover_pending"
    assert out.decision == "policy confirm: waiting for 'hotsite approve'"
    assert [a.severity for a in out.actions if isinstance(a, Page)] == ["critical"]
    out = run.at(20, Command("approve", "uid=0(root)", "site manager agreed"))
    assert out.decision == "starting failover (epoch 1) by uid=0(root): approved: site manager agreed"


def test_witness_unreachable_in_auto_waits_for_an_operator() -> None:
    run = Run(AUTO)
    run.at(0, PrimaryVerdict("down"))
    run.at(0, WitnessVote(None, "witness unreachable"))
    out = run.at(10, Tick())
    assert out.decision == (
        "automatic failover withheld: the witness cannot say (witness unreachable); waiting for an operator"
    )
    out = run.at(11, WitnessVote(False))
    assert (
        out.decision == "starting failover (epoch 1) by daemon: the witness now agrees; the primary is down"
    )


def test_confirm_timeout_proceeds_unless_the_witness_sees_the_primary() -> None:
    policy = dataclasses.replace(CONFIRM, confirm_timeout_s=300)
    run = Run(policy)
    run.at(0, PrimaryVerdict("down"))
    run.at(10, Tick())
    run.at(200, Tick())
    assert run.state.state == "failover_pending"
    assert run.at(310, Tick()).decision.startswith("starting failover (epoch 1) by daemon: no answer within")


def test_hourly_limit_and_minimum_dwell() -> None:
    run = Run(AUTO)
    run.at(0, WitnessVote(False))
    run.at(0, PrimaryVerdict("down"))
    run.at(10, Tick())
    run.at(11, RunbookDone("failover", 1, True, "failover"))
    run.at(100, PrimaryVerdict("up"))
    run.at(101, Tick())
    run.at(102, Command("failback", "uid=0(root)"))
    run.at(103, RunbookDone("failback", 2, True, "normal"))
    assert run.state.state == "primary_active"
    run.at(200, PrimaryVerdict("down"))
    out = run.at(300, Tick())
    assert run.state.state == "failover_pending"
    assert "1 automatic failover(s) in the last hour (limit 1)" in out.decision


def test_operator_commands_are_checked() -> None:
    run = Run(CONFIRM)
    run.at(0, PrimaryVerdict("up"))
    out = run.at(1, Command("failover", "uid=1000(tech)", "drill gone wrong"))
    assert (
        out.refused
        and out.decision == "refused: the primary is judged up; add --force to move routing anyway"
    )
    out = run.at(2, Command("failover", "uid=1000(tech)", "planned move", force=True))
    assert out.decision == "starting failover (epoch 1) by uid=1000(tech): planned move"
    assert (
        run.at(3, Command("failback", "uid=0(root)")).decision
        == "refused: a failing over runbook is running (epoch 1)"
    )
    run.at(4, RunbookDone("failover", 1, True, "failover"))
    assert (
        run.at(5, Command("failover", "x", force=True)).decision
        == "refused: routing is already on the backup"
    )
    assert run.at(6, Command("approve", "x")).refused


def test_maintenance_stops_automatic_action() -> None:
    run = Run(AUTO)
    run.at(0, WitnessVote(False))
    run.at(0, Command("maintenance_on", "uid=0(root)", "replacing the core switch"))
    run.at(1, PrimaryVerdict("down"))
    run.at(100, Tick())
    assert run.state.state == "maintenance" and run.runbooks() == []
    out = run.at(101, Command("maintenance_off", "uid=0(root)"))
    assert out.decision == "maintenance off by uid=0(root); automatic decisions resume from primary_active"
    run.at(102, Tick())
    assert run.state.state == "primary_degraded"


def test_a_failed_runbook_rolls_back_or_holds() -> None:
    run = Run(CONFIRM)
    run.at(0, PrimaryVerdict("down"))
    run.at(1, Command("failover", "uid=0(root)"))
    out = run.at(2, RunbookDone("failover", 1, False, "normal", "kamailio: verify failed"))
    assert run.state.state == "primary_degraded" and run.state.routing == "normal"
    assert out.decision == "failover failed, rolled back to normal routing: kamailio: verify failed"
    run.at(3, Command("failover", "uid=0(root)"))
    run.at(4, RunbookDone("failover", 2, False, "unknown", "rollback timed out"))
    assert run.state.state == "held" and run.state.routing == "unknown"
    assert run.at(5, Command("failover", "uid=0(root)")).decision.startswith("starting failover (epoch 3)")


def test_stale_runbook_results_are_ignored() -> None:
    run = Run(CONFIRM)
    run.at(0, PrimaryVerdict("down"))
    run.at(1, Command("failover", "x"))
    out = run.at(2, RunbookDone("failover", 0, True, "failover"))
    assert (
        out.decision == "ignored a stale failover result (epoch 0, now 1)"
        and run.state.state == "failing_over"
    )


def test_restart_mid_runbook_resumes_with_a_newer_token() -> None:
    run = Run(CONFIRM)
    run.at(0, PrimaryVerdict("down"))
    run.at(1, Command("failover", "x"))
    persisted = EngineState.from_json(run.state.to_json())
    assert persisted == run.state
    restarted = Run(CONFIRM, persisted)
    out = restarted.at(50, Resumed())
    assert out.actions == (RunRunbook("failover", 2, "resumed after a restart", "daemon"),)
    restarted.at(51, RunbookDone("failover", 2, True, "failover"))
    assert restarted.state.state == "backup_active"


def test_a_restart_below_the_worlds_token_continues_above_it() -> None:
    run = Run(Policy(mode="confirm", has_witness=False, hold_down_s=15))
    out = run.at(0, Resumed(world_token=7))
    assert run.state.epoch == 7 and out.decision.startswith("the routing world has obeyed token 7")
    out = run.at(1, Command("failover", "uid=0(root)", "planned", force=True))
    assert out.decision.startswith("starting failover (epoch 8)"), out.decision
    assert Run(Policy()).at(0, Resumed(world_token=0)).state.epoch == 0  # nothing read: nothing moves


def test_auto_failback_after_a_stable_period_and_drills() -> None:
    run = Run(dataclasses.replace(CONFIRM, failback="auto", failback_stable_s=100))
    run.at(0, PrimaryVerdict("down"))
    run.at(1, Command("failover", "x"))
    run.at(2, RunbookDone("failover", 1, True, "failover"))
    run.at(10, PrimaryVerdict("up"))
    run.at(10, Tick())
    assert run.state.state == "failback_pending"
    run.at(50, Tick())
    assert run.state.state == "failback_pending"
    assert (
        run.at(111, Tick()).decision
        == "starting failback (epoch 2) by daemon: primary up and stable for 101s"
    )
    run.at(112, RunbookDone("failback", 2, True, "normal"))
    out = run.at(200, Command("drill", "uid=0(root)"))
    assert out.actions == (RunDrill("uid=0(root)"),) and run.state.routing == "normal"
    assert run.at(230, DrillDone(True, "4 checks passed")).decision == "drill passed: 4 checks passed"


# -- properties ----------------------------------------------------------------------------------

verdicts = st.builds(PrimaryVerdict, st.sampled_from(["up", "down", "down", "degraded", "unknown"]))
votes = st.builds(WitnessVote, st.sampled_from([True, False, False, None]))
commands = st.builds(
    Command,
    st.sampled_from(
        ["failover", "failback", "approve", "cancel", "maintenance_on", "maintenance_off", "drill"]
    ),
    st.just("uid=0(root)"),
    st.just(""),
    st.booleans(),
)
# Weighted towards what the world sends (verdicts, votes, time); operators act now and then.
events = st.one_of(
    verdicts,
    verdicts,
    verdicts,
    votes,
    votes,
    st.builds(Tick),
    st.builds(Tick),
    st.builds(Tick),
    commands,
    st.builds(DrillDone, st.booleans()),
    st.builds(Resumed),
    st.builds(Resumed, st.integers(0, 60)),  # the world's token read at start-up
)


@settings(max_examples=500)
@example(
    script=[(0.0, PrimaryVerdict("down"), True, "normal"), (1.0, WitnessVote(False), True, "normal")],
    mode="auto",
    witness=True,
)
@example(
    script=[
        (0.0, PrimaryVerdict("down"), True, "normal"),
        (20.0, WitnessVote(True), True, "normal"),
        (1.0, Tick(), True, "normal"),
    ],
    mode="auto",
    witness=True,
)
@given(
    script=st.lists(
        st.tuples(
            st.floats(0, 40), events, st.booleans(), st.sampled_from(["normal", "failover", "unknown"])
        ),
        max_size=80,
    ),
    mode=st.sampled_from(["auto", "confirm", "manual"]),
    witness=st.booleans(),
)
def test_safety_properties(script: list[tuple[float, Event, bool, str]], mode: Mode, witness: bool) -> None:
    policy = Policy(mode=mode, has_witness=witness, hold_down_s=15, min_dwell_s=30, max_auto_per_hour=2)
    run = Run(policy)
    now = 0.0
    down_since: float | None = None
    epochs: list[int] = []
    for gap, event, runbook_ok, left in script:
        now += gap
        before = run.state
        out = run.at(now, event)
        if isinstance(event, PrimaryVerdict):
            down_since = (
                (down_since if before.primary == "down" else now) if event.verdict == "down" else None
            )
        for action in out.actions:
            if isinstance(action, RunRunbook):
                epochs.append(action.epoch)
                if action.actor == "daemon" and action.kind == "failover" and not isinstance(event, Resumed):
                    # Never automatic on a blip, never against the witness, never without it in auto.
                    assert down_since is not None and now - down_since >= policy.hold_down_s
                    assert run.state.witness is not True
                    if policy.effective_mode == "auto" and not policy.confirm_timeout_s:
                        assert run.state.witness is False
        # The running runbook's completion, as the edges would report it.
        if run.state.state in ("failing_over", "failing_back"):
            kind = "failover" if run.state.state == "failing_over" else "failback"
            routing = ("failover" if kind == "failover" else "normal") if runbook_ok else left
            run.at(now, RunbookDone(kind, run.state.epoch, runbook_ok, routing))  # type: ignore[arg-type]
        if isinstance(event, Resumed):  # never below what the world already refuses
            assert run.state.epoch >= max(event.world_token, before.epoch)
        # One routing at a time; every change of state is explained.
        assert run.state.routing in ("normal", "failover", "unknown")
        if out.changed:
            assert out.decision
        recent = [t for t in run.state.auto_moves if now - t < 3600]
        assert len(recent) <= policy.max_auto_per_hour
        assert EngineState.from_json(run.state.to_json()) == run.state
    assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs)


world = st.one_of(
    st.builds(
        PrimaryVerdict,
        st.sampled_from(["down", "down", "down", "down", "up", "degraded"]),
        st.just(""),
        st.booleans(),
    ),
    st.builds(WitnessVote, st.sampled_from([True, False, None])),
    st.builds(Tick),
    st.builds(Tick),
)


@settings(max_examples=500)
@example(script=[(0.0, PrimaryVerdict("down")), (20.0, Tick())], mode="auto", confirm_timeout=0.0)
@given(
    script=st.lists(st.tuples(st.floats(0, 20), world), max_size=60),
    mode=st.sampled_from(["auto", "confirm", "manual"]),
    confirm_timeout=st.sampled_from([0.0, 45.0]),
)
def test_automatic_decisions_only_on_lasting_evidence(
    script: list[tuple[float, Event]], mode: Mode, confirm_timeout: float
) -> None:
    """Only the world speaks (no operator): every automatic move is justified, and limited."""
    policy = Policy(
        mode=mode,
        has_witness=True,
        hold_down_s=15,
        min_dwell_s=30,
        max_auto_per_hour=2,
        confirm_timeout_s=confirm_timeout,
        failback="auto",
        failback_stable_s=40,
    )
    run = Run(policy)
    now, down_since, up_since = 0.0, None, None
    for gap, event in script:
        now += gap
        before = run.state
        out = run.at(now, event)
        if isinstance(event, PrimaryVerdict):
            was = before.primary
            down_since = (down_since if was == "down" else now) if event.verdict == "down" else None
            up_since = (up_since if was == "up" else now) if event.verdict == "up" else None
        for action in out.actions:
            if not isinstance(action, RunRunbook):
                continue
            assert action.actor == "daemon"
            if action.kind == "failover":
                assert mode != "manual"
                assert down_since is not None and now - down_since >= policy.hold_down_s
                if run.state.primary_grey:  # reachable and saying no: no partition doubt
                    assert mode == "auto" or confirm_timeout
                else:
                    assert run.state.witness is not True
                    if mode == "auto" and not (confirm_timeout and before.state == "failover_pending"):
                        assert run.state.witness is False
                if mode == "confirm":
                    assert confirm_timeout and now - before.since >= confirm_timeout
            else:
                assert up_since is not None and now - up_since >= policy.failback_stable_s
            run.at(
                now,
                RunbookDone(
                    action.kind, action.epoch, True, "failover" if action.kind == "failover" else "normal"
                ),
            )
        assert len([t for t in run.state.auto_moves if now - t < 3600]) <= policy.max_auto_per_hour


def test_a_grey_failure_needs_no_witness_but_still_the_hold_down() -> None:
    run = Run(AUTO)
    run.at(0, WitnessVote(True, "sees the SBC answering"))
    run.at(0, PrimaryVerdict("down", "site:primary:http says the site cannot serve", grey=True))
    assert run.at(2, Tick()).actions == ()
    out = run.at(10, Tick())
    assert (
        out.decision
        == "starting failover (epoch 1) by daemon: primary reports it cannot serve (grey failure) for 10s:"
        " site:primary:http says the site cannot serve"
    )
    plain = Run(dataclasses.replace(AUTO, mode="confirm"))
    plain.at(0, PrimaryVerdict("down", grey=True))
    assert plain.at(10, Tick()).decision == "policy confirm: waiting for 'hotsite approve'"


# -- several backup sites: planning around a lost one ------------------------------------------


def failed_over(policy: Policy) -> Run:
    """Three sites, the primary lost and failed over to the two backup sites."""
    run = Run(policy)
    run.at(0, BackupVerdict("east", "up"))
    run.at(0, BackupVerdict("west", "up"))
    run.at(0, WitnessVote(False))
    run.at(0, PrimaryVerdict("down"))
    out = run.at(10, Tick())
    if policy.mode != "auto":
        out = run.at(10, Command("approve", "uid=0(root)"))
    assert [a.lost for a in run.runbooks()] == [()], out.decision
    run.at(11, RunbookDone("failover", 1, True, "failover"))
    assert run.state.state == "backup_active"
    return run


def test_a_backup_site_lost_while_serving_is_planned_around_after_the_hold_down() -> None:
    run = failed_over(AUTO)
    run.at(100, BackupVerdict("west", "down", "sbc unreachable"))
    assert run.at(105, Tick()).actions == ()  # a blip of a backup site moves nothing either
    out = run.at(110, Tick())
    assert out.decision == (
        "starting failover without backup site west (epoch 2) by daemon:"
        " backup site west lost while serving: re-planning hotlines"
    )
    replan = run.runbooks()[-1]
    assert (replan.lost, replan.previous_lost) == (("west",), ())
    run.at(111, RunbookDone("failover", 2, True, "failover", lost=("west",)))
    assert (run.state.state, run.state.lost) == ("backup_active", ("west",))
    # West comes back: planned in again only after the stable period (failback_stable_s, 600 s).
    run.at(200, BackupVerdict("west", "up"))
    assert run.at(700, Tick()).actions == ()
    out = run.at(800, Tick())
    assert "backup site west back and stable: re-planning hotlines" in out.decision
    assert run.runbooks()[-1].lost == () and run.runbooks()[-1].previous_lost == ("west",)


def test_no_automatic_replan_when_the_witness_cannot_be_heard() -> None:
    """Isolated (or an etcd standby): 'west is lost' may be our own cut; whoever hears the witness decides."""
    run = failed_over(AUTO)
    run.at(50, WitnessVote(None, "etcd: appliance-east leads; standing by"))
    run.at(100, BackupVerdict("west", "down"))
    out = run.at(110, Tick())
    assert out.decision == (
        "backup site west lost while serving, but the witness cannot say"
        " (etcd: appliance-east leads; standing by): not re-planning"
    )
    assert run.runbooks()[1:] == [] and run.at(120, Tick()).actions == ()
    out = run.at(121, WitnessVote(False, "peers agree"))
    assert out.decision.startswith("starting failover without backup site west (epoch 2)")


def test_a_failed_replan_rolls_back_to_the_old_plan_not_to_the_primary() -> None:
    run = failed_over(AUTO)
    run.at(100, BackupVerdict("east", "down"))
    run.at(110, Tick())
    out = run.at(111, RunbookDone("failover", 2, False, "failover", "kamailio refused", lost=()))
    assert (run.state.state, run.state.routing, run.state.lost) == ("backup_active", "failover", ())
    assert out.decision == "failover failed, rolled back to failover routing: kamailio refused"


def test_without_auto_a_lost_backup_site_pages_and_waits_for_an_operator() -> None:
    run = failed_over(CONFIRM)
    run.at(100, BackupVerdict("west", "down"))
    out = run.at(110, Tick())
    assert (
        out.decision
        == "backup site west lost while serving: 'hotsite failover --to backup --force' re-plans the hotlines"
    )
    assert any(isinstance(a, Page) for a in out.actions) and not run.runbooks()[1:]
    assert run.at(120, Tick()).actions == ()  # paged once, not at every tick
    assert run.at(121, Command("failover", "uid=0(root)")).refused
    out = run.at(122, Command("failover", "uid=0(root)", "west is dark", force=True))
    assert (
        out.decision
        == "starting failover without backup site west (epoch 2) by uid=0(root): re-plan without west: west is dark"
    )


def test_a_restart_mid_replan_resumes_it_with_its_rollback_target() -> None:
    run = failed_over(AUTO)
    run.at(100, BackupVerdict("west", "down"))
    run.at(110, Tick())
    restarted = Run(AUTO, EngineState.from_json(run.state.to_json()))
    out = restarted.at(130, Resumed())
    assert restarted.runbooks() == [
        RunRunbook("failover", 3, "resumed after a restart", "daemon", ("west",), ())
    ]
    assert "resuming the interrupted failover" in out.decision


sites = st.sampled_from(["east", "west"])
multi_world = st.one_of(
    st.builds(PrimaryVerdict, st.sampled_from(["down", "down", "up"])),
    st.builds(BackupVerdict, sites, st.sampled_from(["down", "up", "up", "degraded"])),
    st.builds(WitnessVote, st.sampled_from([False, None])),
    st.builds(Tick),
    st.builds(Tick),
)


@settings(max_examples=400)
@given(
    script=st.lists(st.tuples(st.floats(0, 30), multi_world, st.booleans()), max_size=70),
    mode=st.sampled_from(["auto", "confirm"]),
)
def test_a_lost_backup_site_is_planned_around_only_on_lasting_evidence(
    script: list[tuple[float, Event, bool]], mode: Mode
) -> None:
    policy = Policy(
        mode=mode,
        has_witness=True,
        hold_down_s=15,
        min_dwell_s=0,
        max_auto_per_hour=50,
        failback="auto",
        failback_stable_s=40,
    )
    run = Run(policy)
    now = 0.0
    since: dict[str, tuple[str, float]] = {}
    epochs = []
    for gap, event, ok in script:
        now += gap
        before = run.state
        out = run.at(now, event)
        if isinstance(event, BackupVerdict) and since.get(event.site, ("", 0.0))[0] != event.verdict:
            since[event.site] = (event.verdict, now)
        for action in out.actions:
            if not isinstance(action, RunRunbook):
                continue
            epochs.append(action.epoch)
            if action.kind != "failover" or before.routing != "failover":
                continue
            # A re-plan: automatic only under auto with the witness heard; every newly lost site
            # down for the hold-down, every site planned in again up for the stable period.
            assert mode == "auto" and run.state.witness is not None
            for site in set(action.lost) - set(before.lost):
                verdict, at = since[site]
                assert verdict == "down" and now - at >= policy.hold_down_s
            for site in set(before.lost) - set(action.lost):
                verdict, at = since[site]
                assert verdict == "up" and now - at >= policy.failback_stable_s
            assert action.previous_lost == before.lost
        if run.state.state in ("failing_over", "failing_back"):
            action = run.runbooks()[-1]
            lost = action.lost if ok else (action.previous_lost or ())
            left = (
                "failover"
                if (action.kind == "failover") == ok or action.previous_lost is not None
                else "normal"
            )
            if action.kind == "failback":
                left, lost = ("normal", ()) if ok else ("failover", run.state.lost)
            run.at(now, RunbookDone(action.kind, action.epoch, ok, left, lost=lost))  # type: ignore[arg-type]
        assert set(run.state.lost) <= {"east", "west"}
        if run.state.routing != "failover":
            assert run.state.lost == ()
        assert EngineState.from_json(run.state.to_json()) == run.state
    assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs)


def test_a_completed_failback_says_so_once() -> None:
    """Issue 19: the events showed "Failback completed" twice (one per resolved incident key)."""
    run = Run(dataclasses.replace(CONFIRM, failback="auto", failback_stable_s=100))
    run.at(0, PrimaryVerdict("down"))
    run.at(1, Command("failover", "x"))
    run.at(2, RunbookDone("failover", 1, True, "failover"))
    run.at(10, PrimaryVerdict("up"))
    run.at(111, Tick())
    out = run.at(112, RunbookDone("failback", 2, True, "normal"))
    resolves = [a for a in out.actions if isinstance(a, Resolve)]
    assert {r.key for r in resolves} >= {"failover", "failback"}  # every incident of the episode is closed
    assert [r.summary for r in resolves].count("Failback completed") == 1
