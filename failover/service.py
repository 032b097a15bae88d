"""The failover service: runs the pure engine against the real world.

One task consumes events (verdicts, witness votes, operator commands, timer
ticks, runbook results) from a queue, so the engine sees one event at a
time. After each step the new state is persisted *before* its actions are
carried out: a crash at any point resumes from a state that already knows
what it was doing, and re-runs the interrupted runbook from the top with a
newer fencing token (every actuator step is idempotent).

Side jobs, each its own task under the daemon's supervisor:

* ticks, so timers (hold-down, confirm timeout, stable period) fire;
* the witness poll;
* the reconcile loop, which compares the routing the engine wants with what
  the actuators read back and repairs drift (someone edited Kamailio by
  hand, Kamailio restarted and lost its htables), with an audit event.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from appliance.api import Caller, Handler, RequestError
from appliance.clock import Clock
from appliance.logs import kv
from appliance.store import Store
from appliance.timeouts import cancelled_meanwhile
from failover import plans, runbook, verification
from failover.actuators.base import Actuator, ActuatorError
from failover.engine import (
    Action,
    BackupVerdict,
    CallsVerified,
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
    VerifyCalls,
    WitnessVote,
    step,
    took_over,
)
from failover.routing import Routing
from failover.settings import FailoverConfig as Config
from failover.thirdvote import Voter
from monitoring.health import SiteVerdict

log = logging.getLogger(f"hotsite.{__name__}")

STATE_KEY = "failover.engine"
Pager = Callable[[Page | Resolve], Awaitable[None]]
DrillCheck = Callable[[], Awaitable[tuple[bool, str, dict[str, Any]]]]


def policy_from(config: Config) -> Policy:
    f = config.failover
    return Policy(
        mode=f.policy,
        has_witness=f.witness is not None or config.coordination.backend == "etcd",
        hold_down_s=f.hold_down_s,
        min_dwell_s=f.min_dwell_s,
        max_auto_per_hour=f.max_auto_per_hour,
        confirm_timeout_s=f.confirm_timeout_s,
        failback=f.failback,
        failback_stable_s=f.failback_stable_s,
    )


class FailoverService:
    def __init__(
        self,
        config: Config,
        store: Store,
        clock: Clock,
        actuators: Sequence[Actuator],
        voter: Voter,
        *,
        pager: Pager | None = None,
        drill: DrillCheck | None = None,
        verify_calls: verification.Verifier | None = None,
        on_change: Callable[[EngineState], None] = lambda state: None,
        epoch_is_token: bool = True,
    ) -> None:
        self.config = config
        self.epoch_is_token = epoch_is_token
        self.store = store
        self.clock = clock
        self.actuators = list(actuators)
        self.voter = voter
        self._pager = pager
        self._drill = drill
        self._verify_calls = verify_calls
        self._on_change = on_change
        saved = store.get_state(STATE_KEY)
        self.state = EngineState.from_json(saved) if saved else EngineState(since=clock.time())
        self._queue: asyncio.Queue[tuple[Event, asyncio.Future[Outcome] | None]] = asyncio.Queue()
        self._jobs: set[asyncio.Task[None]] = set()
        self.last_runbook: runbook.RunbookResult | None = None
        self.last_drill: dict[str, Any] | None = None

    @property
    def policy(self) -> Policy:
        # The engine owes verification calls only where something can place them.
        return dataclasses.replace(policy_from(self.config), verify_by_calls=self._verify_calls is not None)

    @property
    def idle(self) -> bool:
        """No event waiting to be stepped and no runbook or job running."""
        return self._queue.empty() and not self._jobs

    def routing_for(self, name: str, lost: tuple[str, ...] = ()) -> Routing:
        """The routing the engine's ``normal``/``failover`` means (failover: without ``lost`` sites)."""
        if name == "failover":
            return plans.failover_routing(self.config, lost)
        return plans.normal_routing(self.config)

    # -- the event loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Consume events until cancelled (owned by the daemon's supervisor)."""
        await self._handle(Resumed(await self._world_token()), None)
        try:
            while True:
                event, reply = await self._queue.get()
                await self._handle(event, reply)
        finally:
            for job in list(self._jobs):
                job.cancel()

    async def _world_token(self) -> int:
        """The newest token the routing world obeyed (0: none read), for a single appliance.

        Under a coordination backend with its own tokens (etcd: the lease's) a
        takeover re-reads the world instead (:meth:`took_over`); alone, the
        engine's epoch is the token, and it must not start below what the world
        already refuses.
        """
        if not self.epoch_is_token:
            return 0
        newest = 0
        for actuator in self.actuators:
            try:
                async with asyncio.timeout(actuator.timeout_s):
                    token = await actuator.obeyed_token()
            except (ActuatorError, TimeoutError) as exc:
                cancelled_meanwhile()  # appliance/timeouts.py: a stop must not become a logged error
                error = str(exc) or type(exc).__name__
                log.warning(
                    "could not read the token the routing world has obeyed; going on from the saved epoch",
                    extra=kv(actuator=actuator.name, error=error, epoch=self.state.epoch),
                )
                continue
            newest = max(newest, token or 0)
        return newest

    async def took_over(self, observed: str, token: int) -> int:
        """A new leader fenced the actuators and read ``observed`` back: the engine follows it.

        The engine decides (event :class:`~failover.engine.TookOver`; it stays the
        only writer of its state) and moves its epoch on; the epoch is returned so
        the fence refuses whatever this appliance had decided before (a reconcile
        under way, a runbook started while it stood by).
        """
        outcome = await self.ask(took_over(observed, token))
        log.warning(outcome.decision, extra=kv(token=token, observed=observed, epoch=outcome.state.epoch))
        return outcome.state.epoch

    def submit(self, event: Event) -> None:
        self._queue.put_nowait((event, None))

    async def ask(self, event: Event) -> Outcome:
        """Submit an event and wait for the engine's outcome (operator commands)."""
        reply: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((event, reply))
        return await reply

    async def _handle(self, event: Event, reply: asyncio.Future[Outcome] | None) -> None:
        before = self.state
        outcome = step(before, event, self.policy, self.clock.time())
        self.state = outcome.state
        self.store.put_state(STATE_KEY, self.state.to_json())  # persisted before anything is done
        if outcome.decision and (
            outcome.changed or outcome.refused or outcome.decision != before.last_decision
        ):
            log.info(
                outcome.decision,
                extra=kv(state=self.state.state, routing=self.state.routing, epoch=self.state.epoch),
            )
            actor = event.actor if isinstance(event, Command) else "daemon"
            self.store.record(
                "failover.decision",
                actor=actor,
                subject=self.state.state,
                message=outcome.decision,
                data={
                    "from": before.state,
                    "to": self.state.state,
                    "routing": self.state.routing,
                    "epoch": self.state.epoch,
                    "event": type(event).__name__,
                },
            )
        if outcome.changed:
            self._on_change(self.state)
        if reply is not None and not reply.done():
            reply.set_result(outcome)
        for action in outcome.actions:
            self._act(action)

    def _act(self, action: Action) -> None:
        if isinstance(action, RunRunbook):
            self._spawn(self._run_runbook(action), f"runbook {action.kind} {action.epoch}")
        elif isinstance(action, RunDrill):
            self._spawn(self._run_drill(action), "drill")
        elif isinstance(action, VerifyCalls):
            job = self._verify_by_calls(action.kind, action.epoch, action.lost)
            self._spawn(job, f"verify {action.kind} {action.epoch}")
        elif isinstance(action, Page | Resolve):
            self._spawn(self._page(action), f"page {action.key}")

    def _spawn(self, job: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(job)
        task.set_name(name)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    # -- actions ------------------------------------------------------------------------------

    async def _run_runbook(self, action: RunRunbook) -> None:
        if action.kind == "failover":
            target = self.routing_for("failover", action.lost)
            previous = (
                self.routing_for("normal")
                if action.previous_lost is None
                else self.routing_for("failover", action.previous_lost)
            )
        else:
            target, previous = self.routing_for("normal"), self.routing_for("failover", self.state.lost)
        self.store.record(
            f"failover.runbook.{action.kind}",
            actor=action.actor,
            subject=f"epoch {action.epoch}",
            message=f"{action.kind} runbook started: {action.reason}",
            data={"target": target.to_json(), "actuators": [a.name for a in self.actuators]},
        )
        result = await runbook.run(
            target,
            previous,
            self.actuators,
            action.epoch,
            step_timeout_s=self.config.failover.step_timeout_s,
            clock=time.monotonic,
        )
        self.last_runbook = result
        self.store.record(
            f"failover.runbook.{action.kind}.{'done' if result.ok else 'failed'}",
            actor=action.actor,
            subject=f"epoch {action.epoch}",
            message=result.detail,
            data=result.to_json(),
        )
        lost = plans.lost_from_name(result.routing)
        left = "normal" if result.routing == "normal" else "failover" if lost is not None else "unknown"
        # A success is then verified by calls: the engine asks for them (VerifyCalls) and keeps them
        # owed in its persisted state until their result, so a crash in between re-places them.
        self.submit(RunbookDone(action.kind, action.epoch, result.ok, left, result.detail, lost or ()))  # type: ignore[arg-type]

    async def _verify_by_calls(self, kind: verification.Kind, epoch: int, lost: tuple[str, ...]) -> None:
        """The change judged by calls (recorded whole for the report, then one engine event)."""
        if self._verify_calls is None:  # the engine asks only when a verifier is wired (policy)
            return
        started = time.time()
        try:
            checks = await self._verify_calls(kind, lost)
        except Exception as exc:  # a broken caller must not leave the change unjudged and silent
            log.exception("verification calls failed to run", extra=kv(kind=kind, epoch=epoch))
            self.submit(CallsVerified(kind, epoch, False, f"the verification calls could not run: {exc}"))
            return
        ok = all(c.ok for c in checks)
        text = verification.summary(checks)
        self.store.record(
            "failover.verification",
            subject=f"epoch {epoch}",
            message=f"{kind} {'verified' if ok else 'NOT verified'} by calls: {text}",
            data={"kind": kind, "epoch": epoch, "ok": ok, "started_at": started, "finished_at": time.time(),
                  "hotlines": [c.to_json() for c in checks]},
        )  # fmt: skip
        self.submit(CallsVerified(kind, epoch, ok, text))

    async def _run_drill(self, action: RunDrill) -> None:
        if self._drill is None:
            self.submit(DrillDone(False, "no drill checks are configured"))
            return
        ok, detail, report = await self._drill()
        self.last_drill = report
        self.store.record("failover.drill", actor=action.actor, message=detail, data=report)
        self.submit(DrillDone(ok, detail))

    async def _page(self, action: Page | Resolve) -> None:
        kind = "page" if isinstance(action, Page) else "resolve"
        self.store.record(f"failover.{kind}", subject=action.key, message=action.summary)
        if self._pager is None:
            log.warning(f"{kind} (no pager wired): {action.summary}", extra=kv(key=action.key))
            return
        try:
            await self._pager(action)
        except Exception:  # paging trouble must never stop a failover
            log.exception("pager failed", extra=kv(key=action.key))

    # -- side jobs ------------------------------------------------------------------------------

    async def ticks(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.submit(Tick())

    async def poll_witness(self, interval_s: float = 2.0) -> None:
        last: tuple[bool | None, str] | None = None
        while True:
            vote = await self.voter.vote()
            if (vote.primary_alive, vote.detail) != last:
                last = (vote.primary_alive, vote.detail)
                self.submit(WitnessVote(vote.primary_alive, vote.detail))
            await asyncio.sleep(interval_s)

    def serving_site(self, hotline: str) -> str | None:
        """Where the routing in force sends ``hotline``: test calls as evidence (monitoring/callevidence.py).

        None while a runbook moves routing or it is unknown: a call then proves nothing about a site.
        """
        state = self.state
        if state.state in ("failing_over", "failing_back", "held"):
            return None
        return plans.hotline_site(self.config, state.routing, state.lost, hotline)

    def on_site_verdict(self, verdict: SiteVerdict) -> None:
        """Called by the monitor whenever a site's verdict changes."""
        site = self.config.sites.get(verdict.site)
        if site is None:
            return
        if site.role == "primary":
            self.submit(PrimaryVerdict(verdict.verdict, "; ".join(verdict.why), grey=verdict.grey))
        else:
            self.submit(BackupVerdict(verdict.site, verdict.verdict, "; ".join(verdict.why)))

    async def reconcile(self) -> None:
        while True:
            await asyncio.sleep(self.config.failover.reconcile_interval_s)
            await self.reconcile_once()

    async def reconcile_once(self) -> list[str]:
        """Compare desired and actual routing; repair drift. Returns what was repaired."""
        state = self.state
        # Not while a runbook moves routing, while it is held for a human, or during a drill: the
        # drill routes its test number for seconds on purpose, and "repairing" that would send its
        # calls elsewhere mid-check.
        if (
            state.state in ("failing_over", "failing_back", "held", "maintenance", "drill")
            or state.routing == "unknown"
        ):
            return []
        desired = self.routing_for(state.routing, state.lost)
        repaired = []
        for actuator in self.actuators:
            try:
                async with asyncio.timeout(self.config.failover.step_timeout_s):
                    differences = await actuator.verify(desired)
            except (ActuatorError, TimeoutError) as exc:
                cancelled_meanwhile()
                log.warning(
                    "reconcile: cannot read actual routing", extra=kv(actuator=actuator.name, error=str(exc))
                )
                continue
            if not differences or self.state.epoch != state.epoch:
                continue
            self.store.record(
                "failover.drift",
                subject=actuator.name,
                message=f"{actuator.name} drifted from {desired.name} routing: {'; '.join(differences)}",
                data={"differences": differences},
            )
            try:
                async with asyncio.timeout(self.config.failover.step_timeout_s):
                    await actuator.apply(desired, state.epoch)
                left = await actuator.verify(desired)
            except (ActuatorError, TimeoutError) as exc:
                cancelled_meanwhile()
                self.store.record("failover.drift.unrepaired", subject=actuator.name, message=str(exc))
                continue
            message = f"{actuator.name} repaired to {desired.name} routing" + (
                f" (still: {left})" if left else ""
            )
            self.store.record("failover.drift.repaired", subject=actuator.name, message=message)
            log.warning(message, extra=kv(actuator=actuator.name))
            repaired.append(actuator.name)
        return repaired

    async def close(self) -> None:
        for job in list(self._jobs):
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
        for actuator in self.actuators:
            with contextlib.suppress(Exception):
                await actuator.close()
        await self.voter.close()

    # -- views ----------------------------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        s = self.state
        now = self.clock.time()
        return {
            "state": s.state,
            "since_s": round(now - s.since, 1),
            "routing": s.routing,
            "epoch": s.epoch,
            "policy": self.config.failover.policy,
            "effective_policy": self.policy.effective_mode,
            "waiting_for": s.waiting_for,
            "primary": s.primary,
            "primary_grey": s.primary_grey,
            "witness": {"primary_alive": s.witness, "detail": s.witness_detail},
            "last_decision": s.last_decision,
            "verification_owed": s.verifying,  # a change's verification calls not yet reported
            "last_runbook": self.last_runbook.to_json() if self.last_runbook else None,
            "lost_sites": list(s.lost),
            "backup_sites": {site: verdict for site, verdict, _ in s.sites},
            "plan": plans.failover_routing(self.config, s.lost).to_json(),
            "actuators": [a.name for a in self.actuators],
        }

    # -- control API: this feature's methods (declared in the feature table, appliance/features.py) --

    def handlers(self) -> dict[str, Handler]:
        """The operator's commands; each becomes an engine event, and a refusal says why."""
        return {
            "failover": self._api_failover,
            "failback": self._api_command("failback"),
            "approve": self._api_command("approve"),
            "cancel": self._api_command("cancel"),
            "maintenance": self._api_maintenance,
            "drill": self._api_command("drill"),
        }

    async def _api_failover(self, caller: Caller, params: dict[str, Any]) -> Any:
        to = params.get("to", "backup")
        backup = plans.backup_site(self.config)
        if to not in ("backup", backup):
            raise RequestError(
                f"--to must be 'backup' or the backup site {backup!r}, got {to!r}"
                " (with several backup sites, hotlines go where the plan sends them)"
            )
        return await self._command(caller, "failover", params)

    def _api_command(self, command: str) -> Handler:
        async def handler(caller: Caller, params: dict[str, Any]) -> Any:
            return await self._command(caller, command, params)

        return handler

    async def _api_maintenance(self, caller: Caller, params: dict[str, Any]) -> Any:
        on = params.get("on")
        if not isinstance(on, bool):
            raise RequestError("on must be true or false")
        return await self._command(caller, "maintenance_on" if on else "maintenance_off", params)

    async def _command(self, caller: Caller, command: str, params: dict[str, Any]) -> Any:
        reason = params.get("reason") or ""
        force = params.get("force", False)
        if not isinstance(reason, str) or len(reason) > 500 or not isinstance(force, bool):
            raise RequestError("reason must be text (at most 500 characters) and force true or false")
        outcome = await self.ask(Command(command, caller.actor, reason, force))  # type: ignore[arg-type]
        if outcome.refused:
            raise RequestError(outcome.decision)
        return {"decision": outcome.decision, "failover": self.view()}
