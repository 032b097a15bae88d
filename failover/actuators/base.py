"""The contract every actuator keeps.

An actuator moves one part of the real world (Kamailio, an IP address, a
carrier's API) to a :class:`~failover.routing.Routing`, and reads it back.

Contract, for every implementation:

* ``apply(routing, token)`` is **idempotent** (applying the same routing twice
  is harmless: a restarted daemon re-runs an interrupted runbook from the
  top) and returns within ``timeout_s``, else raises :class:`ActuatorError`.
  ``token`` is the fencing token of the decision (an increasing integer); an
  actuator that can remember tokens refuses one older than the newest it
  obeyed, raising :class:`StaleToken`, so a paused former leader can never
  move routing again.
* ``verify(routing)`` reads the real state back and returns the differences
  as human lines (empty: it matches). It never changes anything and returns
  within ``timeout_s``, else raises :class:`ActuatorError`.
* ``fence(token)`` makes the **world itself** refuse, from now on, every
  apply that carries a token older than ``token``, whoever sends it (another
  process, another appliance, a write already in flight). A new leader calls
  it on every actuator *before* it reads the routing back, so a former
  leader's write that a pause kept in flight cannot land after the takeover
  and cannot make the re-read see a half-moved world. Rules:

  - **time limit**: returns within ``timeout_s``, else :class:`ActuatorError`;
  - **atomic**: the token is recorded by one atomic write (a rename, one
    htable set, the hook's own commit): recorded or not, never half; once it
    is recorded, later applies with an older token are refused;
  - **never lowers**: fencing again with the same token is harmless; a token
    older than one the world already recorded raises :class:`StaleToken`
    (a newer leader exists: this one must not act) and records nothing;
  - **moves no routing**: it changes only the record of the newest token;
  - **exceptions**: :class:`StaleToken`, :class:`ActuatorError`, nothing else.

  Each actuator says in its docstring how far its world enforces the fence
  (a file or htable checked before each write, a hook that must record it).
* ``rollback(previous, token)`` is ``apply(previous, token)`` unless the
  actuator needs something more careful; it is called, in reverse order,
  for the steps that had been applied when a later step failed.
* ``obeyed_token()`` reads the newest token the world has recorded, or
  ``None`` when this world keeps none. Read-only, within ``timeout_s``, else
  :class:`ActuatorError`. A single appliance reads it at start-up so that
  its epochs continue above it: with its state lost or restored from an
  older copy, starting again at epoch 1 would have every later decision
  refused by the world as stale.
* Nothing but :class:`ActuatorError` (and its subclasses) escapes.

:class:`NullActuator` keeps the contract and touches nothing: the runbook,
the engine and their tests run without any real edge.
"""

from __future__ import annotations

import abc

from appliance.errors import HotsiteError
from failover.routing import Routing


class ActuatorError(HotsiteError):
    """An actuator could not apply, verify or roll back (one line saying why)."""


class StaleToken(ActuatorError):
    """The decision's fencing token is older than one this actuator already obeyed."""


class Actuator(abc.ABC):
    name: str = "actuator"
    timeout_s: float = 5.0
    # True when the world it moves is this appliance's alone (its own replicas): no other
    # leader ever writes it, so an apply need not fit in what is left of the leader lease.
    local_only: bool = False

    @abc.abstractmethod
    async def apply(self, routing: Routing, token: int) -> None: ...

    @abc.abstractmethod
    async def verify(self, routing: Routing) -> list[str]: ...

    @abc.abstractmethod
    async def fence(self, token: int) -> None: ...

    async def rollback(self, previous: Routing, token: int) -> None:
        await self.apply(previous, token)

    async def obeyed_token(self) -> int | None:
        """The newest token the world recorded (None: this world keeps none)."""
        return None

    async def close(self) -> None:  # noqa: B027 -- optional hook: most edges hold nothing to release
        """Release connections; called once at shutdown."""


class NullActuator(Actuator):
    """Touches nothing, remembers what it was told: for dry runs and tests."""

    name = "null"

    def __init__(self) -> None:
        self.applied: list[tuple[Routing, int]] = []
        self.highest_token = 0

    async def apply(self, routing: Routing, token: int) -> None:
        if token < self.highest_token:
            raise StaleToken(f"token {token} is older than {self.highest_token}")
        self.highest_token = token
        self.applied.append((routing, token))

    async def fence(self, token: int) -> None:
        if token < self.highest_token:
            raise StaleToken(f"fence: token {token} is older than {self.highest_token}")
        self.highest_token = token

    async def obeyed_token(self) -> int | None:
        return self.highest_token  # it is its own world

    async def verify(self, routing: Routing) -> list[str]:
        if not self.applied:
            return ["nothing applied yet"]
        current = self.applied[-1][0]
        return [] if current == routing else [f"holds {current.name!r}, wanted {routing.name!r}"]
