"""Fencing at the actuators: every call of a leader passes this gate, with the lease's token, in the lease."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

from appliance.logs import kv
from appliance.timeouts import cancelled_meanwhile
from failover import lease as core
from failover.actuators.base import Actuator, ActuatorError, StaleToken
from failover.coordination.base import NotLeader, Takeover
from failover.etcd.election import EtcdLease
from failover.routing import Routing

log = logging.getLogger("hotsite.failover.etcd")


class Fence:
    """The gate every actuator call of this appliance passes.

    * refuses (:class:`NotLeader`) unless the lease is held and fresh;
    * once per new token, before the first action, **takes over**: presents the
      token to every actuator (``fence``), so the world refuses anything older
      from then on, *then* reads the real routing back (``verify`` against each
      known routing) and hands the result to ``on_takeover(observed, token)``.
      Fencing first means a former leader's write that a pause held in flight
      cannot land after (or during) the re-read: the re-read sees a world that
      no older leader can change any more. A takeover that cannot fence every
      actuator is not complete: nothing is acted on, and it is tried again;
    * returns the token (the leader key's create revision) and the time left.
    """

    def __init__(
        self,
        lease: EtcdLease,
        routings: Callable[[], dict[str, Routing]],
        *,
        on_takeover: Takeover | None = None,
        record: Callable[[str, str, dict[str, Any]], None] = lambda kind, message, data: None,
        step_timeout_s: float | None = None,
    ) -> None:
        self.lease = lease
        self.step_timeout_s = step_timeout_s
        self.routings = routings
        self.on_takeover = on_takeover
        self.record = record
        self.actuators: list[Actuator] = []
        self.verified_token: int | None = None
        self.fenced_token: int | None = None
        self.observed: str | None = None
        self.fence_error: str | None = None  # why the last takeover could not fence, for the status
        self.min_epoch = 0  # engine decisions older than the last takeover are refused
        self._lock = asyncio.Lock()

    def need_s(self, actuator: Actuator) -> float:
        """How much of the lease an apply of ``actuator`` may use: its timeout (or the runbook step's)."""
        if actuator.local_only:
            return 0.0
        if self.step_timeout_s is None:
            return actuator.timeout_s
        return min(actuator.timeout_s, self.step_timeout_s)

    async def admit(self, need_s: float = 0.0) -> tuple[int, float]:
        """The token and the time left, for an action that may take ``need_s``; else NotLeader.

        An action starts only on a fresh lease: one whose view outlasts ``need_s``
        (:func:`failover.lease.may_apply`). When less is left, the lease is renewed
        first; if the renewal fails or still leaves too little, nothing is done.
        """
        state = self.lease.leadership()
        if not self.lease.may_act() or state.token is None:
            raise NotLeader(f"not acting: {state.detail}")
        if state.token != self.verified_token:
            async with self._lock:
                if state.token != self.verified_token:
                    await self.take_over(state.token)
        if not core.may_apply(self.lease.leadership(), self.lease.now(), need_s):
            await self.lease.refresh()
        state = self.lease.leadership()
        if not self.lease.may_act() or state.token is None or state.token != self.verified_token:
            raise NotLeader(f"not acting: leadership changed while taking over or renewing ({state.detail})")
        left = state.valid_until - self.lease.now()
        if not core.may_apply(state, self.lease.now(), need_s):
            why = f"the lease view has {left:.2f}s left after a renewal, an apply may take {need_s:g}s"
            raise NotLeader(f"not acting: {why}")
        return state.token, left

    async def take_over(self, token: int) -> str:
        """Fence every actuator with ``token``, then re-read the routing; NotLeader if fencing fails."""
        await self.fence_all(token)
        return await self.reverify(token)

    async def fence_all(self, token: int) -> None:
        """Present ``token`` to every actuator: from now on the world refuses older ones."""
        for actuator in self.actuators:
            try:
                async with asyncio.timeout(actuator.timeout_s):
                    await actuator.fence(token)
            except (ActuatorError, TimeoutError) as exc:
                cancelled_meanwhile()
                stale = isinstance(exc, StaleToken)
                why = str(exc) or f"{actuator.name}: fence took longer than {actuator.timeout_s:g}s"
                self.fence_error = why
                log.warning(
                    "takeover: cannot fence", extra=kv(token=token, actuator=actuator.name, error=why)
                )
                self.record(
                    "coordination.fence_failed",
                    f"leader with token {token} could not fence {actuator.name}: {why}",
                    {"token": token, "actuator": actuator.name, "error": why, "stale": stale},
                )
                prefix = "a newer leader already fenced" if stale else "cannot fence"
                raise NotLeader(f"not acting: {prefix} {actuator.name}: {why}") from None
        self.fenced_token = token
        self.fence_error = None
        self.record(
            "coordination.fenced",
            f"leader with token {token} fenced {len(self.actuators)} actuator(s)",
            {"token": token, "actuators": [a.name for a in self.actuators]},
        )

    async def reverify(self, token: int) -> str:
        """Which known routing the real world holds: a name, "mixed" or "unreadable"."""
        observed = "mixed"
        try:
            for name, routing in self.routings().items():
                differences: list[str] = []
                for actuator in self.actuators:
                    async with asyncio.timeout(actuator.timeout_s):
                        differences += await actuator.verify(routing)
                if not differences:
                    observed = name
                    break
        except (ActuatorError, TimeoutError) as exc:
            observed = "unreadable"
            log.warning("takeover: cannot read the real routing", extra=kv(error=str(exc)))
        self.observed = observed
        self.record(
            "coordination.takeover",
            f"leader with token {token}: the real routing is {observed}",
            {"token": token, "observed": observed},
        )
        log.warning("takeover: re-read the real routing", extra=kv(token=token, observed=observed))
        if self.on_takeover is not None:
            result = self.on_takeover(observed, token)
            if inspect.isawaitable(result):
                try:
                    async with asyncio.timeout(self.lease.ttl_s):
                        result = await result
                except TimeoutError:
                    cancelled_meanwhile()
                    why = f"the engine did not take the takeover within {self.lease.ttl_s}s"
                    raise NotLeader(f"not acting: {why}") from None
            if isinstance(result, int):
                self.min_epoch = max(self.min_epoch, result)
        self.verified_token = token
        return observed

    def wrap(self, actuators: Sequence[Actuator]) -> list[Actuator]:
        self.actuators = list(actuators)
        return [FencedActuator(a, self) for a in actuators]


class FencedActuator(Actuator):
    """An actuator that acts only for the lease holder, with the lease's token, within the lease.

    ``apply``/``rollback``: the engine's epoch is replaced by the etcd token
    (a later leader always has a larger one); the call is cancelled when the
    lease view would expire (:class:`ActuatorError`); a call decided at an
    engine epoch older than this appliance's last takeover is refused
    (:class:`NotLeader`). ``verify`` only reads and is passed through for anyone.
    """

    def __init__(self, inner: Actuator, gate: Fence) -> None:
        self.inner = inner
        self.gate = gate
        self.name = inner.name
        self.timeout_s = inner.timeout_s
        self.last_token: int | None = None

    async def apply(self, routing: Routing, token: int) -> None:
        fencing_token, left = await self.gate.admit(self.gate.need_s(self.inner))
        if token < self.gate.min_epoch:
            # Decided before this appliance took over and re-read the real routing (a reconcile
            # or runbook that was already under way): the engine decides again from what is.
            raise NotLeader(
                f"{self.name}: not carried out: decided at epoch {token}, before this appliance took"
                f" over and re-read the routing (epoch {self.gate.min_epoch})"
            )
        try:
            async with asyncio.timeout(left):
                await self.inner.apply(routing, fencing_token)
        except TimeoutError:
            cancelled_meanwhile()
            raise ActuatorError(
                f"{self.name}: stopped: the lease view expired during the call (token {fencing_token})"
            ) from None
        self.last_token = fencing_token

    async def verify(self, routing: Routing) -> list[str]:
        return await self.inner.verify(routing)

    async def fence(self, token: int) -> None:
        """Fence the inner actuator with the lease's token (the engine's epoch is not a fencing token)."""
        fencing_token, _ = await self.gate.admit()
        await self.inner.fence(fencing_token)

    async def close(self) -> None:
        await self.inner.close()
