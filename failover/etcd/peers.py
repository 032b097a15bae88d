"""Other appliances as vantage points: what each sees of every site, shared through etcd.

Two sites alone cannot tell a dead primary from a cut link; that is why a
single appliance needs a witness. With three or more sites and an appliance
at each, the appliances at the *other* sites are those vantage points. Each
appliance publishes its monitor's site verdicts under its own etcd session
lease (``/hotsite/<domain>/views/<appliance>``), so a view disappears when
its appliance dies or loses etcd, and only appliances on the side of the
etcd majority can keep theirs fresh. The leader then fails the primary
over only when the other appliances it hears agree that the primary is
down; one that still sees it up means a partition, as with the witness.

Freshness is judged on *our* clock: a view counts while its sequence number
keeps changing, so two appliances' clocks never need to agree.

Pure: :func:`parse_view`, :class:`Freshness` and :func:`judge`. The edge:
:class:`PeerViews` (publish and read, one task) and :class:`PeerVoter`, the
:class:`~failover.thirdvote.Voter` face the engine's witness slot takes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from appliance.logs import kv
from failover.etcd.gateway import EtcdError, Gateway
from failover.thirdvote import Vote, Voter

if TYPE_CHECKING:
    from failover.etcd.election import EtcdLease

log = logging.getLogger(f"hotsite.{__name__}")

MAX_VIEW_BYTES = 16 * 1024
VERDICTS = ("up", "degraded", "down", "unknown")


@dataclass(frozen=True, slots=True)
class PeerView:
    appliance: str
    site: str  # where that appliance stands
    seq: int  # incremented at every publication
    verdicts: dict[str, str] = field(default_factory=dict)  # site -> up | degraded | down | unknown


def render_view(view: PeerView) -> str:
    return json.dumps(
        {"appliance": view.appliance, "site": view.site, "seq": view.seq, "verdicts": view.verdicts},
        sort_keys=True,
    )


def parse_view(raw: str) -> PeerView | None:
    """A peer's published view, or None for anything malformed (never raises)."""
    if len(raw) > MAX_VIEW_BYTES:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    appliance, site, seq, verdicts = (
        doc.get("appliance"),
        doc.get("site"),
        doc.get("seq"),
        doc.get("verdicts"),
    )
    if not (isinstance(appliance, str) and appliance and isinstance(site, str)):
        return None
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(verdicts, dict):
        return None
    clean = {str(k)[:64]: v for k, v in verdicts.items() if isinstance(v, str) and v in VERDICTS}
    return PeerView(appliance[:64], site[:64], seq, clean)


class Freshness:
    """Remembers when each peer's sequence number last changed, on our own clock."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, float]] = {}

    def update(self, views: Iterable[PeerView], now: float) -> list[tuple[PeerView, float]]:
        """The views with the time each was last seen to change; peers no longer listed are forgotten."""
        result, seen = [], {}
        for view in views:
            before = self._seen.get(view.appliance)
            changed_at = before[1] if before is not None and before[0] == view.seq else now
            seen[view.appliance] = (view.seq, changed_at)
            result.append((view, changed_at))
        self._seen = seen
        return result


def judge(
    views: Iterable[tuple[PeerView, float]], *, me: str, primary: str, now: float, max_age_s: float
) -> tuple[bool | None, str]:
    """Does any other appliance still see the primary? (True / False / None = cannot say) and why.

    True as soon as one fresh peer sees it up or degraded (a partition, not a
    dead primary); False only when every fresh peer judges it down; None with
    no fresh peer, or when they cannot say.
    """
    fresh = sorted(
        (view for view, changed_at in views if view.appliance != me and now - changed_at <= max_age_s),
        key=lambda v: v.appliance,
    )
    if not fresh:
        return None, "no other appliance's view is fresh"
    seeing = [v for v in fresh if v.verdicts.get(primary) in ("up", "degraded")]
    if seeing:
        names = ", ".join(f"{v.appliance}@{v.site} ({v.verdicts[primary]})" for v in seeing)
        return True, f"{names} still see{'s' if len(seeing) == 1 else ''} {primary}"
    down = [v for v in fresh if v.verdicts.get(primary) == "down"]
    names = ", ".join(f"{v.appliance}@{v.site}" for v in down)
    if len(down) == len(fresh):
        return False, f"{names} judge{'s' if len(down) == 1 else ''} {primary} down too"
    unsure = ", ".join(v.appliance for v in fresh if v not in down)
    return None, f"{unsure} cannot say whether {primary} is up"


class PeerViews:
    """Publishes this appliance's site verdicts and reads everyone else's (one task: :meth:`run`).

    Contract: :meth:`run` loops until cancelled and survives any etcd
    trouble (a view it cannot publish simply goes stale at the others);
    :meth:`current` answers from memory. Nothing is published before the
    election loop holds a session lease: the view lives and dies with it.
    """

    def __init__(
        self,
        gateway: Gateway,
        lease: EtcdLease,
        *,
        domain: str,
        appliance: str,
        site: str,
        verdicts: Callable[[], dict[str, str]],
        interval_s: float = 1.0,
        prefix: str = "/hotsite",
        clock: Callable[[], float],
    ) -> None:
        self.gateway = gateway
        self.lease = lease
        self.prefix = f"{prefix}/{domain}/views/"
        self.appliance = appliance
        self.site = site
        self._verdicts = verdicts
        self.interval_s = interval_s
        self.max_age_s = 3 * interval_s + 2 * gateway.timeout_s
        self._clock = clock
        self._seq = 0
        self._freshness = Freshness()
        self._views: list[tuple[PeerView, float]] = []
        self.malformed = 0

    async def run(self) -> None:
        while True:
            try:
                await self.publish()
                await self.refresh()
            except EtcdError as exc:
                log.debug("peer views: etcd trouble", extra=kv(error=str(exc)))
            await asyncio.sleep(self.interval_s)

    async def publish(self) -> None:
        lease_id = self.lease.state.lease_id
        if lease_id is None:
            return
        self._seq += 1
        view = PeerView(self.appliance, self.site, self._seq, dict(self._verdicts()))
        await self.gateway.put(self.prefix + self.appliance, render_view(view), lease_id)

    async def refresh(self) -> None:
        views = []
        for key, found in await self.gateway.get_prefix(self.prefix):
            view = parse_view(found.get("value", ""))
            if view is None or key != self.prefix + view.appliance:
                self.malformed += 1
                log.warning("peer views: ignored a malformed view", extra=kv(key=key[:200]))
                continue
            views.append(view)
        self._views = self._freshness.update(views, self._clock())

    def current(self) -> list[tuple[PeerView, float]]:
        return list(self._views)

    def now(self) -> float:
        return self._clock()

    def view(self) -> list[dict[str, Any]]:
        """For ``hotsite status``: each peer, where it stands, what it sees, how fresh."""
        now = self._clock()
        return [
            {
                "appliance": v.appliance,
                "site": v.site,
                "verdicts": v.verdicts,
                "age_s": round(now - changed_at, 1),
                "fresh": now - changed_at <= self.max_age_s,
            }
            for v, changed_at in sorted(self._views, key=lambda item: item[0].appliance)
        ]


class PeerVoter(Voter):
    """The witness slot filled by the other appliances' views (contract of :class:`Voter`: never raises)."""

    def __init__(self, views: PeerViews, primary: str) -> None:
        self.views = views
        self.primary = primary

    async def vote(self) -> Vote:
        now = self.views.now()
        alive, detail = judge(
            self.views.current(),
            me=self.views.appliance,
            primary=self.primary,
            now=now,
            max_age_s=self.views.max_age_s,
        )
        return Vote(alive, f"peers: {detail}", now, "peers")
