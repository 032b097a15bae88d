"""The failover engine: a pure state machine over (state, event, now).

``step(state, event, policy, now) -> Outcome`` returns the new state, the
actions the edges must carry out (run a runbook, page, resolve a page) and a
readable decision, which the daemon logs at INFO and the tests assert on.
Nothing here does I/O or reads a clock: ``now`` is unix time, passed in.

The states, and what moves them::

    primary_active ──primary down──▶ primary_degraded ──hold-down over──▶ failing_over
          ▲   ▲                          │    (auto: witness agrees)          │ runbook ok
          │   └──────primary back────────┘                                   ▼
          │                              └──▶ failover_pending ──approve──▶ backup_active
          │                                  (confirm, manual, no witness,    │
          │                                   rate limit)                     │ primary back
          │                                                                   ▼
          └──────────runbook ok──────── failing_back ◀──failback / stable── failback_pending

    maintenance: no automatic action until switched off.  drill: a readiness
    test that moves nothing.  held: a runbook failed *and* its rollback failed;
    routing is unknown and only an operator may move it again.

With several backup sites the failover routing also names the backup sites
that are *lost* (``EngineState.lost``): hotlines go to the surviving sites
by plan. A backup site lost while it serves (down for ``hold_down_s``) is
re-planned around, and one back for ``failback_stable_s`` is planned in
again: a new failover runbook with a new epoch, automatic under ``auto``
while the witness (or, on etcd, the leadership) is heard, an operator's
``hotsite failover --force`` otherwise.

Safety rules, each tested as a property:

* Routing is always exactly one of "normal" and "failover": never both sites.
* Nothing moves on a blip: the primary must be judged down for
  ``hold_down_s`` first, and an automatic move needs the witness to agree
  (no witness: ``auto`` behaves as ``confirm``).
* At most ``max_auto_per_hour`` automatic failovers; none within
  ``min_dwell_s`` of the last routing change.
* Every decision that moves routing increments ``epoch``, the fencing token
  the actuators check. It never starts below the token the world has obeyed
  (:class:`Resumed`), even when the saved state was lost or is an older copy.
* A site the engine judges lost never receives calls by the failover plan.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from failover import plans

EngineStateName = Literal[
    "primary_active",
    "primary_degraded",
    "failover_pending",
    "failing_over",
    "backup_active",
    "failback_pending",
    "failing_back",
    "maintenance",
    "drill",
    "held",
]
ENGINE_STATES: tuple[str, ...] = typing.get_args(EngineStateName)
RUNNING = ("failing_over", "failing_back")
HOUR = 3600.0


# -- policy --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    mode: Literal["auto", "confirm", "manual"] = "confirm"
    has_witness: bool = False
    hold_down_s: float = 30.0
    min_dwell_s: float = 300.0
    max_auto_per_hour: int = 1
    confirm_timeout_s: float = 0.0  # confirm: proceed after this long without an answer; 0 = never
    failback: Literal["manual", "auto"] = "manual"
    failback_stable_s: float = 600.0
    # Every successful runbook is followed by verification calls (failover/verification.py): the
    # engine then keeps a pending mark until their result, so a restart re-places them.
    verify_by_calls: bool = False

    @property
    def effective_mode(self) -> str:
        return "confirm" if self.mode == "auto" and not self.has_witness else self.mode


# -- state ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineState:
    state: EngineStateName = "primary_active"
    since: float = 0.0
    routing: Literal["normal", "failover", "unknown"] = "normal"  # what is applied (or being applied)
    epoch: int = 0  # fencing token of the newest routing decision
    primary: str = "unknown"  # the primary site's latest verdict
    primary_since: float = 0.0
    primary_grey: bool = False  # down because it says it cannot serve (reachable): no partition doubt
    primary_why: str = ""  # the verdict's reasons, as the monitor gave them (for the decisions' words)
    witness: bool | None = None  # does the witness see the primary?
    witness_detail: str = "no vote yet"
    routing_changed_at: float = 0.0
    auto_moves: tuple[float, ...] = ()  # times of automatic failovers, for the hourly limit
    waiting_for: str = ""  # what a pending state waits for, in words
    before_maintenance: EngineStateName | None = None
    last_decision: str = "started"
    # The backup sites' latest verdicts: (site, verdict, since), sorted by site.
    sites: tuple[tuple[str, str, float], ...] = ()
    lost: tuple[str, ...] = ()  # backup sites the failover routing avoids (sorted)
    # What a running runbook rolls back to: None = normal routing, else failover without these.
    previous_lost: tuple[str, ...] | None = None
    # The change (at ``epoch``) whose verification calls are owed: set when its runbook succeeds,
    # cleared by their result or by a newer change. A restart finding it set places them again.
    verifying: Literal["failover", "failback"] | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["auto_moves"] = list(self.auto_moves)
        data["sites"] = [list(entry) for entry in self.sites]
        data["lost"] = list(self.lost)
        data["previous_lost"] = None if self.previous_lost is None else list(self.previous_lost)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineState:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["auto_moves"] = tuple(values.get("auto_moves", ()))
        values["sites"] = tuple((str(a), str(b), float(c)) for a, b, c in values.get("sites", ()))
        values["lost"] = tuple(values.get("lost", ()))
        if values.get("previous_lost") is not None:
            values["previous_lost"] = tuple(values["previous_lost"])
        return cls(**values)

    def site_verdict(self, site: str) -> tuple[str, float]:
        """A backup site's latest verdict and since when ("unknown", 0.0 if never heard of)."""
        return next(((v, since) for name, v, since in self.sites if name == site), ("unknown", 0.0))


# -- events --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrimaryVerdict:
    verdict: str  # up | degraded | down | unknown
    why: str = ""
    grey: bool = False  # the primary answered and said it cannot serve


@dataclass(frozen=True, slots=True)
class BackupVerdict:
    """A backup site's verdict changed (where the failover plan may send hotlines)."""

    site: str
    verdict: str  # up | degraded | down | unknown
    why: str = ""


@dataclass(frozen=True, slots=True)
class WitnessVote:
    primary_alive: bool | None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Command:
    command: Literal[
        "failover", "failback", "approve", "cancel", "maintenance_on", "maintenance_off", "drill"
    ]
    actor: str
    reason: str = ""
    force: bool = False


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: timers (hold-down, confirm timeout, stable period) are evaluated."""


@dataclass(frozen=True, slots=True)
class RunbookDone:
    kind: Literal["failover", "failback"]
    epoch: int
    ok: bool
    routing: Literal["normal", "failover", "unknown"]  # what the runbook left in place
    detail: str = ""
    lost: tuple[str, ...] = ()  # with routing "failover": the backup sites it avoids


@dataclass(frozen=True, slots=True)
class DrillDone:
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Resumed:
    """The daemon restarted with this persisted state.

    ``world_token`` is the newest fencing token the routing world has obeyed, as
    read at start-up (0: none read). Above the persisted epoch it means this
    state was lost or restored from an older copy: epochs continue from it, or
    every later decision would be refused by the world as stale.
    """

    world_token: int = 0


@dataclass(frozen=True, slots=True)
class TookOver:
    """This appliance took the leader lease, fenced the actuators and read the real routing back.

    ``routing`` is what it found ("unknown" when the world was mixed or could not
    be read), ``lost`` the backup sites a failover routing avoids, ``observed``
    the routing's name as read (for the decision text).
    """

    routing: Literal["normal", "failover", "unknown"]
    token: int
    observed: str = ""
    lost: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CallsVerified:
    """The test calls placed after a runbook of ``epoch`` (failover.verification): did the hotlines answer
    where the plan sends them, with audio? ``summary`` names each hotline's result, failures first."""

    kind: Literal["failover", "failback"]
    epoch: int
    ok: bool
    summary: str


def took_over(observed: str, token: int) -> TookOver:
    """The event for a takeover that read ``observed`` back: a routing's name, "mixed" or "unreadable".

    "normal" and every failover routing (``failover-without:west``…) are followed;
    anything else is "unknown" (the engine holds for an operator).
    """
    lost = plans.lost_from_name(observed)
    routing: Literal["normal", "failover", "unknown"] = (
        "normal" if observed == "normal" else "failover" if lost is not None else "unknown"
    )
    return TookOver(routing, token, observed, lost or ())


Event = (
    PrimaryVerdict
    | BackupVerdict
    | WitnessVote
    | Command
    | Tick
    | RunbookDone
    | DrillDone
    | Resumed
    | TookOver
    | CallsVerified
)


# -- actions -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunRunbook:
    kind: Literal["failover", "failback"]
    epoch: int
    reason: str
    actor: str
    lost: tuple[str, ...] = ()  # failover: the backup sites the plan avoids
    previous_lost: tuple[str, ...] | None = None  # what to roll back to: None = normal routing


@dataclass(frozen=True, slots=True)
class RunDrill:
    actor: str


@dataclass(frozen=True, slots=True)
class Page:
    key: str  # incidents are deduplicated by key
    severity: Literal["info", "warning", "error", "critical"]
    summary: str


@dataclass(frozen=True, slots=True)
class Resolve:
    key: str
    summary: str


@dataclass(frozen=True, slots=True)
class VerifyCalls:
    """Place the verification calls for the ``kind`` change at ``epoch`` (answered by CallsVerified)."""

    kind: Literal["failover", "failback"]
    epoch: int
    lost: tuple[str, ...] = ()  # failover: the backup sites the plan in force avoids


Action = RunRunbook | RunDrill | Page | Resolve | VerifyCalls


@dataclass(frozen=True, slots=True)
class Outcome:
    state: EngineState
    actions: tuple[Action, ...] = ()
    decision: str = ""
    refused: bool = False  # an operator command that was not carried out (the CLI exits 1)
    changed: bool = field(default=False)


# -- the step ----------------------------------------------------------------------------

PRIMARY_DOWN = "primary-down"
FAILOVER = "failover"


def step(state: EngineState, event: Event, policy: Policy, now: float) -> Outcome:
    """Apply one event. Pure: same inputs, same outcome."""
    state = _observe(state, event, now)
    if isinstance(event, Command):
        outcome = _command(state, event, policy, now)
    elif isinstance(event, RunbookDone):
        outcome = _runbook_done(state, event, policy, now)
    elif isinstance(event, DrillDone):
        outcome = _drill_done(state, event, now)
    elif isinstance(event, Resumed):
        outcome = _resumed(state, event, policy, now)
    elif isinstance(event, TookOver):
        outcome = _took_over(state, event, now)
    elif isinstance(event, CallsVerified):
        outcome = _calls_verified(state, event)
    else:
        outcome = _evaluate(state, policy, now)
    changed = outcome.state.state != state.state or outcome.state.routing != state.routing
    final = dataclasses.replace(outcome.state, last_decision=outcome.decision or state.last_decision)
    return dataclasses.replace(outcome, state=final, changed=changed)


def _observe(state: EngineState, event: Event, now: float) -> EngineState:
    """Remember what the world says, whatever the state."""
    if isinstance(event, PrimaryVerdict):
        if event.verdict != state.primary:
            return dataclasses.replace(
                state,
                primary=event.verdict,
                primary_since=now,
                primary_grey=event.grey,
                primary_why=event.why,
            )
        return dataclasses.replace(state, primary_grey=event.grey, primary_why=event.why)
    if isinstance(event, WitnessVote):
        return dataclasses.replace(state, witness=event.primary_alive, witness_detail=event.detail)
    if isinstance(event, BackupVerdict):
        verdict, since = state.site_verdict(event.site)
        if verdict == event.verdict:
            return state
        others = [entry for entry in state.sites if entry[0] != event.site]
        return dataclasses.replace(state, sites=tuple(sorted([*others, (event.site, event.verdict, now)])))
    return state


def _down_sites(state: EngineState, now: float, held_s: float = 0.0) -> set[str]:
    return {site for site, verdict, since in state.sites if verdict == "down" and now - since >= held_s}


def _wanted_lost(state: EngineState, policy: Policy, now: float, *, at_once: bool = False) -> tuple[str, ...]:
    """The backup sites a failover routing should avoid now.

    A site is planned around once down for the hold-down, and planned in
    again once up for ``failback_stable_s`` (``at_once``: an operator's
    command, or the first failover, takes the verdicts as they are).
    """
    if at_once:
        return tuple(sorted(_down_sites(state, now)))
    lost = set(state.lost) | _down_sites(state, now, policy.hold_down_s)
    for site in state.lost:
        verdict, since = state.site_verdict(site)
        if verdict == "up" and now - since >= policy.failback_stable_s:
            lost.discard(site)
    return tuple(sorted(lost))


def _to(state: EngineState, name: EngineStateName, now: float, **changes: Any) -> EngineState:
    return dataclasses.replace(state, state=name, since=now, **changes)


def _stay(state: EngineState, decision: str = "") -> Outcome:
    return Outcome(state, (), decision)


def _for(state: EngineState, now: float) -> str:
    return f"{now - state.since:.0f}s"


# -- automatic evaluation ------------------------------------------------------------


def _evaluate(state: EngineState, policy: Policy, now: float) -> Outcome:
    handler: Callable[[EngineState, Policy, float], Outcome] = _EVALUATE.get(state.state, _idle)
    return handler(state, policy, now)


def _idle(state: EngineState, policy: Policy, now: float) -> Outcome:
    return _stay(state)


def _primary_active(state: EngineState, policy: Policy, now: float) -> Outcome:
    if state.primary != "down":
        return _stay(state)
    decision = f"primary judged down; holding down {policy.hold_down_s:g}s before deciding"
    page = Page(PRIMARY_DOWN, "warning", "Primary site judged down; failover decision in progress")
    return Outcome(_to(state, "primary_degraded", now, waiting_for="hold-down"), (page,), decision)


def _primary_degraded(state: EngineState, policy: Policy, now: float) -> Outcome:
    if state.primary != "down":
        decision = f"primary is {state.primary} again after {_for(state, now)}: a blip, no action"
        resolve = Resolve(PRIMARY_DOWN, "Primary site recovered before any failover")
        return Outcome(_to(state, "primary_active", now, waiting_for=""), (resolve,), decision)
    if now - state.since < policy.hold_down_s:
        return _stay(state)
    return _decide_failover(state, policy, now)


def _decide_failover(state: EngineState, policy: Policy, now: float) -> Outcome:
    mode = policy.effective_mode
    if state.primary_grey and policy.mode == "auto":
        # We reached the primary and it says it cannot serve: no partition to rule out,
        # so the witness's vote is not needed (it sees the SBC answering, as we do).
        blocked = _auto_blocked(state, policy, now)
        if blocked is None:
            reason = f"primary reports it cannot serve (grey failure) for {_for(state, now)}"
            reason += f": {state.primary_why}" if state.primary_why else ""
            return _start(state, "failover", now, reason, "daemon", automatic=True)
        return _pending(state, now, f"automatic failover withheld: {blocked}; waiting for an operator")
    if state.witness is True and mode != "manual":
        decision = "primary unreachable from here but the witness sees it: a partition, not failing over"
        return _stay(dataclasses.replace(state, waiting_for="witness to lose the primary"), decision)
    if mode == "auto":
        blocked = _auto_blocked(state, policy, now)
        if blocked is None and state.witness is False:
            reason = f"primary down for {_for(state, now)} and the witness agrees"
            return _start(state, "failover", now, reason, "daemon", automatic=True)
        why = blocked or "the witness cannot say (" + state.witness_detail + ")"
        return _pending(state, now, f"automatic failover withheld: {why}; waiting for an operator")
    if mode == "confirm":
        return _pending(state, now, "policy confirm: waiting for 'hotsite approve'")
    return _pending(state, now, "policy manual: waiting for 'hotsite failover --to backup'")


def _auto_blocked(state: EngineState, policy: Policy, now: float) -> str | None:
    recent = [t for t in state.auto_moves if now - t < HOUR]
    if len(recent) >= policy.max_auto_per_hour:
        return f"{len(recent)} automatic failover(s) in the last hour (limit {policy.max_auto_per_hour})"
    since_change = now - state.routing_changed_at
    if state.routing_changed_at and since_change < policy.min_dwell_s:
        return f"routing changed {since_change:.0f}s ago (minimum dwell {policy.min_dwell_s:g}s)"
    return None


def _pending(state: EngineState, now: float, waiting: str) -> Outcome:
    page = Page(PRIMARY_DOWN, "critical", f"Primary site down; {waiting}")
    return Outcome(_to(state, "failover_pending", now, waiting_for=waiting), (page,), waiting)


def _failover_pending(state: EngineState, policy: Policy, now: float) -> Outcome:
    if state.primary != "down":
        decision = f"primary is {state.primary} again: pending failover cancelled"
        resolve = Resolve(PRIMARY_DOWN, "Primary site recovered; no failover was needed")
        return Outcome(_to(state, "primary_active", now, waiting_for=""), (resolve,), decision)
    timeout = policy.confirm_timeout_s
    if (
        policy.effective_mode == "confirm"
        and timeout
        and now - state.since >= timeout
        and state.witness is not True
    ):
        reason = f"no answer within confirm_timeout_s={timeout:g}s"
        return _start(state, "failover", now, reason, "daemon", automatic=True)
    evidence = state.witness is False and policy.has_witness or state.primary_grey
    witness_agrees = policy.mode == "auto" and evidence
    if witness_agrees and _auto_blocked(state, policy, now) is None:
        why = "the primary reports it cannot serve" if state.primary_grey else "the witness now agrees"
        return _start(state, "failover", now, f"{why}; the primary is down", "daemon", True)
    return _stay(state)


def _replan(state: EngineState, policy: Policy, now: float) -> Outcome | None:
    """Serving from backup sites and one of them was lost (or came back): plan hotlines anew."""
    wanted = _wanted_lost(state, policy, now)
    if wanted == state.lost:
        return None
    gone, back = set(wanted) - set(state.lost), set(state.lost) - set(wanted)
    why = "; ".join(
        part
        for part in (
            f"backup site {', '.join(sorted(gone))} lost while serving" if gone else "",
            f"backup site {', '.join(sorted(back))} back and stable" if back else "",
        )
        if part
    )
    if policy.effective_mode == "auto" and policy.has_witness and state.witness is None:
        # Cut off from the witness (or not the etcd leader): "west is lost" may be our own
        # isolation. Whoever can hear the witness decides; an operator still can.
        waiting = f"{why}, but the witness cannot say ({state.witness_detail}): not re-planning"
        if state.waiting_for == waiting:
            return None
        return _stay(dataclasses.replace(state, waiting_for=waiting), waiting)
    if policy.effective_mode != "auto":
        waiting = f"{why}: 'hotsite failover --to backup --force' re-plans the hotlines"
        if state.waiting_for == waiting:
            return _stay(state)
        page = Page(FAILOVER, "critical", f"{why}; hotlines still routed by the old plan")
        return Outcome(dataclasses.replace(state, waiting_for=waiting), (page,), waiting)
    return _start(state, "failover", now, f"{why}: re-planning hotlines", "daemon", False, lost=wanted)


def _backup_active(state: EngineState, policy: Policy, now: float) -> Outcome:
    replan = _replan(state, policy, now)
    if replan is not None:
        return replan
    if state.primary != "up":
        return _stay(state)
    waiting = (
        f"primary up; automatic failback after {policy.failback_stable_s:g}s stable"
        if policy.failback == "auto"
        else "primary up; waiting for 'hotsite failback'"
    )
    page = Page("failback", "info", f"Primary site is back; {waiting}")
    return Outcome(_to(state, "failback_pending", now, waiting_for=waiting), (page,), waiting)


def _failback_pending(state: EngineState, policy: Policy, now: float) -> Outcome:
    replan = _replan(state, policy, now)
    if replan is not None:
        return replan
    if state.primary != "up":
        decision = f"primary is {state.primary} again: failback no longer pending"
        return Outcome(
            _to(state, "backup_active", now, waiting_for=""), (Resolve("failback", decision),), decision
        )
    stable = now - state.primary_since
    if policy.failback == "auto" and stable >= policy.failback_stable_s:
        return _start(state, "failback", now, f"primary up and stable for {stable:.0f}s", "daemon", False)
    return _stay(state)


_EVALUATE: dict[str, Callable[[EngineState, Policy, float], Outcome]] = {
    "primary_active": _primary_active,
    "primary_degraded": _primary_degraded,
    "failover_pending": _failover_pending,
    "backup_active": _backup_active,
    "failback_pending": _failback_pending,
}


def _start(
    state: EngineState,
    kind: Literal["failover", "failback"],
    now: float,
    reason: str,
    actor: str,
    automatic: bool,
    *,
    lost: tuple[str, ...] | None = None,
) -> Outcome:
    """Start a runbook. A failover plans around ``lost`` (default: the backup sites down now)."""
    epoch = state.epoch + 1
    target: Literal["normal", "failover"] = "failover" if kind == "failover" else "normal"
    moves = (*[t for t in state.auto_moves if now - t < HOUR], now) if automatic else state.auto_moves
    previous = state.lost if state.routing == "failover" else None
    if kind == "failover":
        lost = tuple(sorted(_down_sites(state, now))) if lost is None else lost
    else:
        lost = state.lost  # kept until the failback completes: a rollback returns to it
    new = _to(
        state,
        "failing_over" if kind == "failover" else "failing_back",
        now,
        routing=target,
        epoch=epoch,
        auto_moves=moves,
        routing_changed_at=now,
        waiting_for=f"{kind} runbook (epoch {epoch})",
        lost=lost,
        previous_lost=previous,
        verifying=None,  # a newer change: the older one's calls would prove nothing now
    )
    without = f" without backup site {', '.join(lost)}" if kind == "failover" and lost else ""
    page = Page(FAILOVER, "critical", f"{kind.capitalize()}{without} started by {actor}: {reason}")
    decision = f"starting {kind}{without} (epoch {epoch}) by {actor}: {reason}"
    run = RunRunbook(kind, epoch, reason, actor, lost if kind == "failover" else (), previous)
    return Outcome(new, (run, page), decision)


# -- operator commands ---------------------------------------------------------------------


def _refuse(state: EngineState, why: str) -> Outcome:
    return Outcome(state, (), f"refused: {why}", refused=True)


def _command(state: EngineState, cmd: Command, policy: Policy, now: float) -> Outcome:
    if state.state in RUNNING and cmd.command != "maintenance_on":
        return _refuse(state, f"a {state.state.replace('_', ' ')} runbook is running (epoch {state.epoch})")
    if state.state == "maintenance" and cmd.command not in ("maintenance_off", "failover", "failback"):
        return _refuse(state, "in maintenance: switch it off first ('hotsite maintenance off')")
    handler = _COMMANDS[cmd.command]
    return handler(state, cmd, policy, now)


def _cmd_failover(state: EngineState, cmd: Command, policy: Policy, now: float) -> Outcome:
    if state.routing == "failover" and state.state != "held":
        wanted = _wanted_lost(state, policy, now, at_once=True)
        if wanted != state.lost and cmd.force:
            without = ", ".join(wanted) or "no lost backup site"
            reason = f"re-plan without {without}: {cmd.reason or 'operator'}"
            return _start(state, "failover", now, reason, cmd.actor, automatic=False, lost=wanted)
        if wanted != state.lost:
            return _refuse(
                state, "routing is already on the backup; add --force to re-plan around lost sites"
            )
        return _refuse(state, "routing is already on the backup")
    if state.primary == "up" and not cmd.force:
        return _refuse(state, "the primary is judged up; add --force to move routing anyway")
    return _start(state, "failover", now, cmd.reason or "operator command", cmd.actor, automatic=False)


def _cmd_failback(state: EngineState, cmd: Command, policy: Policy, now: float) -> Outcome:
    if state.routing == "normal" and state.state != "held":
        return _refuse(state, "routing is already normal (on the primary)")
    if state.primary != "up" and not cmd.force:
        return _refuse(state, f"the primary is judged {state.primary}; add --force to fail back anyway")
    return _start(state, "failback", now, cmd.reason or "operator command", cmd.actor, automatic=False)


def _cmd_approve(state: EngineState, cmd: Command, policy: Policy, now: float) -> Outcome:
    if state.state == "failover_pending":
        return _start(
            state, "failover", now, f"approved: {cmd.reason or 'operator approval'}", cmd.actor, False
        )
    if state.state == "failback_pending":
        return _start(
            state, "failback", now, f"approved: {cmd.reason or 'operator approval'}", cmd.actor, False
        )
    return _refuse(state, f"nothing is waiting for approval (state {state.state})")


def _cmd_cancel(state: EngineState, cmd: Command, policy: Policy, now: float) -> Outcome:
    if state.state == "failover_pending":
        decision = f"pending failover cancelled by {cmd.actor}: {cmd.reason or 'no reason given'}"
        return Outcome(_to(state, "primary_degraded", now, waiting_for="operator cancelled"), (), decision)
    if state.state == "failback_pending":
        decision = f"pending failback cancelled by {cmd.actor}"
        return Outcome(_to(state, "backup_active", now, waiting_for=""), (), decision)
    return _refuse(state, f"nothing pending to cancel (state {state.state})")


def _cmd_maintenance_on(state: EngineState, cmd: Command, policy: Policy, now: float) -> Outcome:
    if state.state == "maintenance":
        return _refuse(state, "already in maintenance")
    resume: EngineStateName = "backup_active" if state.routing == "failover" else "primary_active"
    if state.state in RUNNING:
        return _refuse(state, "a runbook is running; wait for it to finish")
    decision = f"maintenance on by {cmd.actor}: {cmd.reason or 'no reason given'}; no automatic action"
    new = _to(state, "maintenance", now, before_maintenance=resume, waiting_for="maintenance off")
    return Outcome(new, (Page("maintenance", "info", decision),), decision)


def _cmd_maintenance_off(state: EngineState, cmd: Command, policy: Policy, now: float) -> Outcome:
    if state.state != "maintenance":
        return _refuse(state, "not in maintenance")
    back = state.before_maintenance or "primary_active"
    decision = f"maintenance off by {cmd.actor}; automatic decisions resume from {back}"
    new = _to(state, back, now, before_maintenance=None, waiting_for="")
    return Outcome(new, (Resolve("maintenance", decision),), decision)


def _cmd_drill(state: EngineState, cmd: Command, policy: Policy, now: float) -> Outcome:
    if state.state != "primary_active":
        return _refuse(state, f"a drill needs normal operation (state {state.state})")
    decision = f"drill started by {cmd.actor}: readiness checks, production routing untouched"
    return Outcome(_to(state, "drill", now, waiting_for="drill checks"), (RunDrill(cmd.actor),), decision)


_COMMANDS: dict[str, Callable[[EngineState, Command, Policy, float], Outcome]] = {
    "failover": _cmd_failover,
    "failback": _cmd_failback,
    "approve": _cmd_approve,
    "cancel": _cmd_cancel,
    "maintenance_on": _cmd_maintenance_on,
    "maintenance_off": _cmd_maintenance_off,
    "drill": _cmd_drill,
}


# -- results from the edges ----------------------------------------------------------------


def _runbook_done(state: EngineState, done: RunbookDone, policy: Policy, now: float) -> Outcome:
    if done.epoch != state.epoch or state.state not in RUNNING:
        return _stay(state, f"ignored a stale {done.kind} result (epoch {done.epoch}, now {state.epoch})")
    if done.ok:
        outcome = _runbook_succeeded(state, done, now)
        if not policy.verify_by_calls:
            return outcome
        verify = VerifyCalls(done.kind, done.epoch, outcome.state.lost if done.kind == "failover" else ())
        marked = dataclasses.replace(outcome.state, verifying=done.kind)
        return dataclasses.replace(outcome, state=marked, actions=(*outcome.actions, verify))
    return _runbook_failed(state, done, now)


def _runbook_succeeded(state: EngineState, done: RunbookDone, now: float) -> Outcome:
    if done.kind == "failover":
        new = _to(state, "backup_active", now, routing="failover", waiting_for="")
        page = Page(
            FAILOVER, "critical", f"Failover completed: calls now go to the backup site ({done.detail})"
        )
        return Outcome(new, (page,), f"failover completed (epoch {done.epoch}): {done.detail}")
    new = _to(state, "primary_active", now, routing="normal", waiting_for="", lost=())
    resolves = (  # one "Failback completed" per episode: each key says what closed it
        Resolve(FAILOVER, "Failback completed"),
        Resolve(PRIMARY_DOWN, "Primary serving again"),
        Resolve("failback", "Routing is back on the primary: the failback request is closed"),
    )
    return Outcome(new, resolves, f"failback completed (epoch {done.epoch}): {done.detail}")


def _runbook_failed(state: EngineState, done: RunbookDone, now: float) -> Outcome:
    if done.routing == "unknown":
        new = _to(state, "held", now, routing="unknown", waiting_for="an operator: routing state unknown")
        page = Page(FAILOVER, "critical", f"{done.kind} failed and could not be rolled back: {done.detail}")
        return Outcome(new, (page,), f"{done.kind} failed, rollback failed too: holding ({done.detail})")
    back: EngineStateName = "backup_active" if done.routing == "failover" else "primary_degraded"
    lost = done.lost if done.routing == "failover" else ()
    new = _to(state, back, now, routing=done.routing, waiting_for="", lost=lost)
    page = Page(FAILOVER, "critical", f"{done.kind} failed and was rolled back: {done.detail}")
    return Outcome(new, (page,), f"{done.kind} failed, rolled back to {done.routing} routing: {done.detail}")


VERIFICATION = "verification"


def _calls_verified(state: EngineState, done: CallsVerified) -> Outcome:
    """The calls judge the change; routing stays as it is (a failed call is evidence for a human, and
    moving calls again on it could flap). A failure pages; a later good verification resolves it."""
    if done.epoch != state.epoch:
        return _stay(state, f"ignored stale {done.kind} call results (epoch {done.epoch}, now {state.epoch})")
    state = dataclasses.replace(state, verifying=None)  # owed no more: the calls have judged the change
    if done.ok:
        return Outcome(
            state,
            (Resolve(VERIFICATION, f"{done.kind.capitalize()} verified by calls: {done.summary}"),),
            f"{done.kind} verified by calls (epoch {done.epoch}): {done.summary}",
        )
    page = Page(VERIFICATION, "critical", f"{done.kind.capitalize()} NOT verified by calls: {done.summary}")
    return Outcome(state, (page,), f"{done.kind} NOT verified by calls (epoch {done.epoch}): {done.summary}")


def _drill_done(state: EngineState, done: DrillDone, now: float) -> Outcome:
    if state.state != "drill":
        return _stay(state, "ignored a drill result outside a drill")
    verdict = "passed" if done.ok else "FAILED"
    new = _to(state, "primary_active", now, waiting_for="")
    actions: tuple[Action, ...] = (
        () if done.ok else (Page("drill", "warning", f"DR drill failed: {done.detail}"),)
    )
    return Outcome(new, actions, f"drill {verdict}: {done.detail}")


def _took_over(state: EngineState, event: TookOver, now: float) -> Outcome:
    """A new leader follows the real routing, not what it believed while it stood by.

    A standby's engine may believe "normal" while the former leader had failed
    over; without this its reconcile loop would "repair" the real routing back.
    Mixed or unreadable routing puts the engine in ``held`` (an operator decides).
    The epoch moves on: whatever this appliance had decided before (a runbook
    started while it stood by) is stale, its result ignored, and the fence
    refuses to carry out anything decided at an older epoch.
    """
    follows: dict[str, EngineStateName] = {"normal": "primary_active", "failover": "backup_active"}
    name = follows.get(event.routing, "held")
    observed = event.observed or event.routing
    decision = f"took over the lease (token {event.token}): the real routing is {observed}; engine follows it"
    new = _to(
        state,
        name,
        now,
        routing=event.routing,
        lost=event.lost if event.routing == "failover" else (),
        previous_lost=None,
        epoch=state.epoch + 1,
        before_maintenance=None,
        verifying=None,  # the former leader's change: its calls are not this appliance's to owe
        waiting_for="an operator: routing state unknown" if name == "held" else "",
    )
    actions: tuple[Action, ...] = ()
    if name == "held":
        summary = f"New leader cannot tell the routing ({observed}): {decision}"
        actions = (Page(FAILOVER, "critical", summary),)
    return Outcome(new, actions, decision)


def _resumed(state: EngineState, event: Resumed, policy: Policy, now: float) -> Outcome:
    if event.world_token > state.epoch:
        adopted = dataclasses.replace(state, epoch=event.world_token)
        outcome = _resumed(adopted, Resumed(), policy, now)
        why = (
            f"the routing world has obeyed token {event.world_token}, above this appliance's epoch"
            f" {state.epoch} (its state was lost or is an older copy): epochs continue from"
            f" {event.world_token}; "
        )
        return dataclasses.replace(outcome, decision=why + outcome.decision)
    if state.state in RUNNING:
        kind: Literal["failover", "failback"] = "failover" if state.state == "failing_over" else "failback"
        epoch = state.epoch + 1
        new = dataclasses.replace(state, epoch=epoch, waiting_for=f"{kind} runbook (epoch {epoch}, resumed)")
        decision = f"resuming the interrupted {kind} from the top (epoch {epoch}; every step is idempotent)"
        lost = state.lost if kind == "failover" else ()
        run = RunRunbook(kind, epoch, "resumed after a restart", "daemon", lost, state.previous_lost)
        return Outcome(new, (run,), decision)
    if state.state == "drill":
        return Outcome(_to(state, "primary_active", now), (), "an interrupted drill was abandoned at restart")
    if state.verifying is not None:
        return _resume_verification(state, state.verifying, policy)
    return _stay(state, f"resumed in {state.state} with {state.routing} routing")


def _resume_verification(
    state: EngineState, kind: Literal["failover", "failback"], policy: Policy
) -> Outcome:
    """The daemon died after a change and before its verification calls reported: place them again.

    Routing moved but nothing proved it by a call; the report's "first good call" would never come.
    The calls are placed from the top (each is a fresh call), judged against the routing in force.
    """
    if not policy.verify_by_calls:  # turned off (or no hotlines listed) since: nothing can place them
        decision = f"resumed in {state.state}; the {kind}'s verification calls are dropped: verification off"
        return _stay(dataclasses.replace(state, verifying=None), decision)
    lost = state.lost if kind == "failover" else ()
    decision = (
        f"resumed in {state.state} with {state.routing} routing; placing the interrupted {kind}'s"
        f" verification calls again (epoch {state.epoch})"
    )
    return Outcome(state, (VerifyCalls(kind, state.epoch, lost),), decision)
