"""The leader lease as a pure state: when may this appliance act, and with which token?

Several appliances share one routing domain (the hotlines of one call centre);
exactly one of them may move routing at a time. The decision lives in etcd
(``failover.etcd``): a lease with a TTL, kept alive by its holder, and a
leader key created under that lease only if absent. The key's create revision
is the **fencing token**: every leader that ever held the key has a larger one
than every leader before it.

This module is the part that needs no network, so it is tested with a
simulated clock and property tests: the coordinator feeds it what etcd
answered and *when the request was sent*, and asks :func:`may_act`.

Why the send time: etcd restarts a lease's TTL when it processes the
keep-alive, which is after we sent it. So the lease expires on the server no
earlier than ``sent_at + ttl``, and no new leader can create the key before
then. Counting from the send time (minus a margin for clock rates) makes our
own view expire *first*: a leader stops acting before anyone else can start.
Counting from the answer's arrival would not (a slow answer would stretch our
view past the server's expiry).

Everything that is not a clear success makes us stop acting at once (an error,
a timeout, a key that is not ours), never "probably still leader": unknown
leadership keeps the current routing and says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["leader", "follower", "unknown"]


def default_margin(ttl_s: float) -> float:
    """Safety margin subtracted from every lease view: clock-rate difference and scheduling noise."""
    return max(0.25, 0.05 * ttl_s)


def lease_deadline(sent_at: float, ttl_s: float, margin_s: float) -> float:
    """Until when we may trust a lease renewed by a request sent at ``sent_at``."""
    return sent_at + ttl_s - margin_s


def admit(highest: int, token: int) -> bool:
    """The fencing rule an actuator applies: obey a token no older than the newest obeyed.

    Equal tokens are the same leader's tenure (several runbooks, the reconcile
    loop), so they are admitted; an older one is a former leader coming back.
    """
    return token >= highest


@dataclass(frozen=True, slots=True)
class LeaseState:
    """What this appliance knows of its lease and of the leader key, on the boot-time clock."""

    domain: str
    me: str
    lease_id: int | None = None
    valid_until: float = 0.0  # our lease is trusted until then (from the last renewal's send time)
    token: int | None = None  # create revision of the leader key, when we hold it
    holder: str | None = None  # who holds the key, as last read (None: nobody or unknown)
    holder_token: int | None = None
    reachable: bool = False
    detail: str = "not started"
    since: float = 0.0  # when the role last changed

    @property
    def role(self) -> Role:
        if not self.reachable:
            return "unknown"
        return "leader" if self.token is not None else "follower"

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "appliance": self.me,
            "role": self.role,
            "may_act": may_act(self, now),
            "token": self.token,
            "holder": self.holder,
            "holder_token": self.holder_token,
            "lease_id": self.lease_id,
            "lease_left_s": round(max(0.0, self.valid_until - now), 3) if self.lease_id else None,
            "reachable": self.reachable,
            "detail": self.detail,
            "since_s": round(now - self.since, 1),
        }


def may_act(state: LeaseState, now: float) -> bool:
    """True only while we hold the key and our lease view is fresh."""
    return state.role == "leader" and now < state.valid_until


def may_apply(state: LeaseState, now: float, need_s: float) -> bool:
    """May a leader *start* an action that can take up to ``need_s``: only if the lease view outlasts it.

    The view ends at ``sent + ttl - margin`` of the last successful renewal, so
    this is the bound on the renewal's age: an apply starts only if the lease
    was renewed (request sent) less than ``ttl - margin - need_s`` ago, and the
    caller renews first otherwise. A failed renewal has already dropped the
    token (:func:`unreachable`): nothing starts until a renewal succeeds and
    the key is read back as ours again.
    """
    return may_act(state, now) and state.valid_until - now > need_s


def apply_bound_problem(ttl_s: float, need_s: float) -> str | None:
    """Why an apply that may take ``need_s`` could never start under a lease of ``ttl_s`` (None: it can)."""
    view = ttl_s - default_margin(ttl_s)
    if need_s >= view:
        return (
            f"an apply may take {need_s:g}s but a renewed lease is trusted for at most {view:g}s"
            f" (ttl_s {ttl_s:g} minus the margin {default_margin(ttl_s):g}): no apply could ever start"
        )
    return None


def _moved(before: LeaseState, after: LeaseState, now: float) -> LeaseState:
    return after if after.role == before.role else dataclasses.replace(after, since=now)


def granted(state: LeaseState, lease_id: int, ttl_s: float, *, sent_at: float, margin_s: float) -> LeaseState:
    """A new session lease (no key held under it yet)."""
    if ttl_s <= 0:
        return unreachable(state, f"etcd granted lease {lease_id} with TTL {ttl_s}", sent_at)
    new = dataclasses.replace(
        state,
        lease_id=lease_id,
        valid_until=lease_deadline(sent_at, ttl_s, margin_s),
        token=None,
        reachable=True,
        detail=f"session lease {lease_id} granted ({ttl_s:g}s)",
    )
    return _moved(state, new, sent_at)


def renewed(state: LeaseState, ttl_s: float, *, sent_at: float, margin_s: float, now: float) -> LeaseState:
    """A keep-alive answer: ``ttl_s`` <= 0 means etcd no longer knows the lease (it expired)."""
    if state.lease_id is None:
        return state
    if ttl_s <= 0:
        new = dataclasses.replace(
            state,
            lease_id=None,
            valid_until=0.0,
            token=None,
            reachable=True,
            detail=f"lease {state.lease_id} expired on the server: not leader",
        )
        return _moved(state, new, now)
    deadline = lease_deadline(sent_at, ttl_s, margin_s)
    new = dataclasses.replace(state, valid_until=max(state.valid_until, deadline), reachable=True)
    return _moved(state, new, now)


def acquired(state: LeaseState, token: int, *, now: float) -> LeaseState:
    """Our compare-create of the leader key succeeded (or the key is found under our lease)."""
    new = dataclasses.replace(
        state,
        token=token,
        holder=state.me,
        holder_token=token,
        reachable=True,
        detail=f"leader of {state.domain} with token {token}",
    )
    return _moved(state, new, now)


def held_by(state: LeaseState, holder: str | None, token: int | None, *, now: float) -> LeaseState:
    """Someone else holds the key (or nobody, ``holder`` None): we are not the leader."""
    if holder is None:
        detail = f"no leader of {state.domain} yet"
    else:
        detail = f"{holder} leads {state.domain} (token {token}); standing by"
    if state.token is not None:
        detail = f"lost leadership of {state.domain}: " + detail
    new = dataclasses.replace(
        state, token=None, holder=holder, holder_token=token, reachable=True, detail=detail
    )
    return _moved(state, new, now)


def unreachable(state: LeaseState, detail: str, now: float) -> LeaseState:
    """etcd did not answer clearly: stop acting now; the lease id is kept to try renewing it."""
    new = dataclasses.replace(
        state,
        token=None,
        reachable=False,
        detail=f"etcd unreachable ({detail}): not acting, keeping the current routing",
    )
    return _moved(state, new, now)


def released(state: LeaseState, now: float) -> LeaseState:
    new = dataclasses.replace(
        state, lease_id=None, valid_until=0.0, token=None, reachable=False, detail="stopped"
    )
    return _moved(state, new, now)
