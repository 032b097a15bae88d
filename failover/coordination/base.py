"""The contract every coordination backend keeps (the daemon relies on nothing else).

Patroni's ``AbstractDCS`` in spirit: the daemon wires one object, whatever
decides "may this appliance move routing". Two backends exist:
:class:`~failover.coordination.witness.WitnessOnly` (one appliance, its witness
is the third vote) and :class:`~failover.coordination.etcd.Etcd` (a leader
lease per routing domain, fencing tokens from etcd revisions).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from failover.actuators.base import Actuator, ActuatorError
from failover.thirdvote import Voter

# (observed routing, fencing token) -> the engine's epoch after it followed what was observed.
# Called once per new token, after every actuator was fenced and the routing read back.
Takeover = Callable[[str, int], Awaitable[int | None] | int | None]
# (role, detail): role is "leader", "follower" or "unknown" (cannot tell: nobody may act).
RoleListener = Callable[[str, str], None]
# (kind, message, data) for the audit log.
Recorder = Callable[[str, str, dict[str, Any]], None]
Job = Callable[[], Coroutine[Any, Any, None]]


class NotLeader(ActuatorError):
    """An actuator call was refused: this appliance may not act now (no lease, or it cannot tell)."""


class Coordination(abc.ABC):
    """Decides whether this appliance may act, and guards every action it takes.

    Contract, for every backend:

    * **Construction** reads local files only (TLS, credentials) and touches no
      network; a bad file is a :class:`~appliance.errors.ConfigError` naming the key.
    * :meth:`voter` returns the :class:`~failover.thirdvote.Voter` the engine polls.
      It keeps the Voter contract: returns within its ``timeout_s``, never raises;
      "cannot tell" is a vote of ``None`` with the reason.
    * :meth:`guard` returns the actuators the engine acts through. A refused call
      raises :class:`NotLeader` (an :class:`ActuatorError`: a runbook treats it as a
      failed step, never as done). A guarded call keeps the actuator contract and
      never outlives the right to act: it is cut off (``ActuatorError``) when that
      right would lapse. A backend whose leader can change **takes over** before
      the first action under a new fencing token, as one step serialised by a lock:
      it fences every actuator with the token (``Actuator.fence``), then reads the
      real routing back, then calls ``on_takeover(observed, token)`` (the engine's
      ``TookOver`` event) and from then on refuses every apply decided at an engine
      epoch below the one it returned. A takeover that cannot fence every actuator
      acts on nothing and is retried.
    * :meth:`jobs` are the long-running tasks the daemon's supervisor owns (none
      for a backend with nothing to run). Cancelling them releases what they hold
      within ``2 x request_timeout_s`` (the etcd lease is revoked, so a standby
      takes over at once).
    * :meth:`view` answers from memory: never raises, never blocks; it always has
      ``backend``.
    * :meth:`on_change` listeners are called on the event loop when the role
      changes; a listener's exception is logged, never propagated.
    """

    name: str = "?"
    #: True when the engine's epoch is the fencing token the world sees, so a starting
    #: daemon must go on above the newest token the world obeyed. False when the backend
    #: supplies its own tokens (etcd revisions) and a takeover re-reads the world instead.
    epoch_is_token: bool = True

    @abc.abstractmethod
    def voter(self, witness: Voter, site_verdicts: Callable[[], dict[str, str]]) -> Voter:
        """The voter for the engine, given the configured witness (a NullVoter when there is none)."""

    @abc.abstractmethod
    def guard(self, actuators: Sequence[Actuator], *, on_takeover: Takeover) -> list[Actuator]:
        """The actuators, wrapped so that only an appliance allowed to act acts."""

    @abc.abstractmethod
    def jobs(self) -> dict[str, Job]:
        """Name -> coroutine factory, for the daemon's supervisor (started once, after :meth:`guard`)."""

    @abc.abstractmethod
    def view(self) -> dict[str, Any]:
        """What ``hotsite status`` shows under ``coordination`` (``backend`` at least)."""

    def on_change(self, listener: RoleListener) -> None:  # noqa: B027 -- a backend without roles never calls it
        """Call ``listener(role, detail)`` whenever this appliance's role changes."""
