"""The third vote: does someone other than us see the primary?

With two sites, the backup cannot tell "the primary is dead" from "my link
to the primary is cut". An automatic failover therefore needs a third
vantage point's word. This module is that word's interface (it counts no
quorum: it asks one vantage point); backends:

* :class:`NullVoter`: no witness configured; always "unknown", so ``auto``
  degrades to ``confirm``.
* ``failover.witness.HttpWitnessVoter``: a small ``hotsite witness`` agent
  at a third location (e.g. the carrier edge) that probes the primary itself.
* ``failover.etcd.EtcdVoter``: several appliances sharing an etcd lease; only
  the leader passes on its witness's word (or the other sites' views,
  ``failover.etcd.peers.PeerVoter``).

Contract: ``vote()`` returns within ``timeout_s`` and never raises; an
unreachable or confused witness is a :class:`Vote` with
``primary_alive=None`` and a ``detail`` saying why. A stale answer (older
than ``max_age_s``) is also ``None``: acting on an old view is how split
brains happen.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Vote:
    primary_alive: bool | None  # None: the witness cannot say (unreachable, stale, no witness)
    detail: str
    at: float  # when the witness formed this view (our monotonic clock)
    source: str = "none"

    def to_json(self) -> dict[str, object]:
        return {"primary_alive": self.primary_alive, "detail": self.detail, "source": self.source}


class Voter(abc.ABC):
    timeout_s: float = 2.0

    @abc.abstractmethod
    async def vote(self) -> Vote: ...

    async def close(self) -> None:  # noqa: B027 -- optional hook: most edges hold nothing to release
        """Release connections; called once at shutdown."""


class NullVoter(Voter):
    def __init__(self, clock: object = None) -> None:
        self._now = 0.0

    async def vote(self) -> Vote:
        return Vote(None, "no witness configured", self._now, "none")
