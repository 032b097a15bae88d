"""The election loop for one routing domain, and the Voter face that passes on only the leader's word.

Each appliance holds a **session lease** (etcd v3 lease, ``ttl_s``) and tries
to create the leader key ``/hotsite/<domain>/leader`` under it with a
transaction that succeeds only if the key does not exist (compare
``create_revision == 0``). The one that created it leads until its lease
expires or it revokes it; the key's ``create_revision`` is the **fencing
token** handed to the actuators. The pure lease state and its timing rules are
in :mod:`failover.lease`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

from appliance.logs import kv
from appliance.timeouts import cancelled_meanwhile
from failover import lease as core
from failover.etcd.gateway import EtcdError, Gateway, boottime, holder_of
from failover.thirdvote import NullVoter, Vote, Voter

log = logging.getLogger("hotsite.failover.etcd")


class EtcdLease:
    """Holds or waits for the leader key of one routing domain.

    Contract: :meth:`leadership` and :meth:`may_act` answer from memory, never
    raise, never block. :meth:`run` loops until cancelled: a leader renews its
    lease every ``ttl_s / 3`` and re-reads the key; a standby tries the
    compare-create every ``retry_s``. Any unclear answer demotes at once
    (role "unknown"); a clear "the key is someone else's" demotes to "follower".
    A starting appliance is never leader until etcd says so: a former leader
    that comes back starts passive.
    """

    def __init__(
        self,
        gateway: Gateway,
        *,
        domain: str,
        appliance: str,
        ttl_s: int = 10,
        retry_s: float = 0.5,
        site: str = "",
        clock: Callable[[], float] = boottime,
        prefix: str = "/hotsite",
    ) -> None:
        self.gateway = gateway
        self.key = f"{prefix}/{domain}/leader"
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self.margin_s = core.default_margin(ttl_s)
        self.site = site
        self._clock = clock
        self.state = core.LeaseState(domain=domain, me=appliance, since=clock())
        self.changed = asyncio.Event()  # set whenever the role or token changes
        self._listeners: list[Callable[[core.LeaseState], None]] = []
        self._last_renew = -1e18
        self._cycle_lock = asyncio.Lock()
        self.refreshes = 0  # renewals made because an apply needed more of the lease than was left

    # -- views ---------------------------------------------------------------------------
    def now(self) -> float:
        return self._clock()

    def may_act(self) -> bool:
        return core.may_act(self.state, self._clock())

    def leadership(self) -> core.LeaseState:
        """The current view, demoted to "unknown" if the lease view ran out since the last cycle."""
        state, now = self.state, self._clock()
        if state.role == "leader" and now >= state.valid_until:
            return core.unreachable(state, "lease view expired before it could be renewed", now)
        return state

    def on_change(self, listener: Callable[[core.LeaseState], None]) -> None:
        self._listeners.append(listener)

    def _set(self, new: core.LeaseState) -> None:
        old, self.state = self.state, new
        if (old.role, old.token) != (new.role, new.token):
            level = logging.WARNING if old.role == "leader" or new.role == "unknown" else logging.INFO
            log.log(
                level,
                "coordination role changed",
                extra=kv(domain=new.domain, role=new.role, was=old.role, token=new.token, detail=new.detail),
            )
            self.changed.set()
            for listener in self._listeners:
                try:
                    listener(new)
                except Exception:  # a listener's bug must not stop the election loop
                    log.exception("coordination listener failed")

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            await self.cycle()
            # cycle() turns every failure into "unreachable", and a cancellation that
            # lands while httpx is mid-request can come back as an error instead: never
            # let that keep a cancelled loop alive (a stop would wait for it forever).
            cancelled_meanwhile()
            leader = self.state.role == "leader"
            await asyncio.sleep(self.ttl_s / 3 if leader else self.retry_s)

    async def refresh(self) -> None:
        """Renew now (a leader: keep-alive, then read the key back), for an action the view is too short for.

        Never raises (like :meth:`cycle`); the new view is in :meth:`leadership`.
        """
        self.refreshes += 1
        await self.cycle()

    async def cycle(self) -> None:
        """One round: get or renew the session lease, then take or check the leader key."""
        async with self._cycle_lock:  # the loop and a refresh never interleave their requests
            await self._guarded_cycle()

    async def _guarded_cycle(self) -> None:
        try:
            await self._cycle()
        except EtcdError as exc:
            self._set(core.unreachable(self.state, str(exc), self._clock()))
        except Exception as exc:  # the contract: the loop survives anything and demotes
            log.exception("coordination cycle failed")
            self._set(core.unreachable(self.state, f"{type(exc).__name__}: {exc}", self._clock()))

    async def _cycle(self) -> None:
        now = self._clock()
        if self.state.lease_id is None:
            new_id, ttl = await self.gateway.grant(self.ttl_s)
            self._last_renew = now
            self._set(core.granted(self.state, new_id, ttl, sent_at=now, margin_s=self.margin_s))
        elif (
            self.state.role != "follower"
            or now - self._last_renew >= self.ttl_s / 3
            or now >= self.state.valid_until - self.ttl_s / 3
        ):
            ttl = await self.gateway.keepalive(self.state.lease_id)
            self._last_renew = now
            self._set(core.renewed(self.state, ttl, sent_at=now, margin_s=self.margin_s, now=self._clock()))
            if self.state.lease_id is None:  # expired on the server: a new one next cycle
                return
        lease_id = self.state.lease_id
        assert lease_id is not None
        value = json.dumps({"appliance": self.state.me, "site": self.site, "lease": lease_id})
        created, found = await self.gateway.create_if_absent(self.key, value, lease_id)
        now = self._clock()
        if created or found and found["lease"] == lease_id:
            self._set(core.acquired(self.state, found["create_revision"], now=now))
        elif found:
            self._set(core.held_by(self.state, holder_of(found), found["create_revision"], now=now))
        else:  # deleted between compare and read: nobody; try again next cycle
            self._set(core.held_by(self.state, None, None, now=now))

    async def release(self) -> None:
        """Clean stop: revoke the lease so a standby takes over at once, not after the TTL."""
        lease_id = self.state.lease_id
        self._set(core.released(self.state, self._clock()))
        if lease_id is not None:
            with contextlib.suppress(EtcdError):
                await self.gateway.revoke(lease_id)


class EtcdVoter(Voter):
    """Only the leader's vote counts: a standby or an appliance cut from etcd votes "unknown".

    ``inner`` is what the leader believes about the primary (the witness, or
    :class:`~failover.thirdvote.NullVoter`). Contract of :class:`Voter`: never raises.
    """

    def __init__(
        self,
        lease: EtcdLease,
        inner: Voter | None = None,
        *,
        members_ok: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.lease = lease
        self.inner = inner or NullVoter()
        self.timeout_s = self.inner.timeout_s
        self._members_ok = members_ok

    async def vote(self) -> Vote:
        try:
            state = self.lease.leadership()
            at = self.lease.now()
            if state.role != "leader":
                return Vote(None, f"etcd: {state.detail}", at, "etcd")
            problem = self._members_ok()
            if problem:
                return Vote(None, f"etcd: {problem}", at, "etcd")
            vote = await self.inner.vote()
            if not self.lease.may_act():  # the lease ran out while we asked
                return Vote(None, "etcd: leadership lapsed during the vote", at, "etcd")
            return Vote(
                vote.primary_alive, f"leader (token {state.token}); {vote.detail}", vote.at, vote.source
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return Vote(None, f"etcd voter failed: {type(exc).__name__}", 0.0, "etcd")

    async def close(self) -> None:
        await self.inner.close()
