"""Per-hotline plans: which called number goes where when the primary is lost.

A bank's call centre has one number per product line or customer tier, and
the backup site has fewer seats than the primary. So a failover is not "send
everything to the backup": hotlines are served in priority order, each by
the first destination in its preference list that still has the agents it
needs (a site's seats, a remote-agent pool), and the rest fall through to
self-service (an IVR or an announcement, capacity 0 = unlimited).

With more than two sites (a primary and several backup sites, each with
its own seats), a failover spreads the hotlines over the sites that are
still serving, and a backup site lost while it serves is planned around:
every function here takes the set of *lost* sites besides the primary.

Pure: :func:`failover_routing` and :func:`normal_routing` compute a
:class:`~failover.routing.Routing` from the configuration; :func:`problems`
lists what makes a plan unusable (the config check reports them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING

from failover.routing import Routing

if TYPE_CHECKING:
    from failover.settings import FailoverConfig as Config
    from failover.settings import HotlineSection


@dataclass(frozen=True, slots=True)
class Destination:
    name: str
    kind: str  # site | ivr | announcement | remote_agents
    kamailio_set: int
    capacity: int  # agent seats; 0 = unlimited

    @property
    def unlimited(self) -> bool:
        return self.capacity == 0


@dataclass(frozen=True, slots=True)
class Assignment:
    hotline: str
    number: str
    destination: str
    kamailio_set: int
    agents: int
    why: str


def destinations(config: Config) -> dict[str, Destination]:
    found = {
        name: Destination(name, "site", site.kamailio_set, site.seats) for name, site in config.sites.items()
    }
    for name, dest in config.destinations.items():
        found[name] = Destination(name, dest.kind, dest.kamailio_set, dest.capacity)
    return found


def backup_sites(config: Config) -> list[str]:
    """Every backup site, in the configuration's order (the first is the default destination)."""
    return [name for name, site in config.sites.items() if site.role == "backup"]


def backup_site(config: Config) -> str:
    return backup_sites(config)[0]


def serving_site(config: Config, lost: Iterable[str] = ()) -> str | None:
    """The first backup site not lost: where calls to numbers that are not hotlines go."""
    gone = set(lost)
    return next((name for name in backup_sites(config) if name not in gone), None)


def hotline_site(config: Config, routing: str, lost: Iterable[str], hotline: str) -> str | None:
    """The site that serves ``hotline`` under ``routing`` ("normal" or "failover" without ``lost``).

    None when no site does: the routing is unknown, or the plan sends the hotline to an IVR,
    an announcement, or nowhere.
    """
    if routing == "normal":
        return config.primary[0]
    if routing != "failover":
        return None
    assigned, _ = assign(config, {config.primary[0], *lost})
    where = next((a.destination for a in assigned if a.hotline == hotline), None)
    return where if where in config.sites else None


def by_priority(hotlines: Mapping[str, HotlineSection]) -> list[tuple[str, HotlineSection]]:
    """Hotlines in the order they are served and checked: priority, then name."""
    return sorted(hotlines.items(), key=lambda item: (item[1].priority, item[0]))


def assign(config: Config, lost: str | Iterable[str]) -> tuple[list[Assignment], list[str]]:
    """Serve hotlines by priority from what is left when the ``lost`` site(s) are gone.

    Returns the assignments and, for hotlines nothing could take, one
    problem line each.
    """
    gone = {lost} if isinstance(lost, str) else set(lost)
    places = destinations(config)
    left = {name: d.capacity for name, d in places.items()}
    assignments, unserved = [], []
    ordered = by_priority(config.hotlines)
    for name, line in ordered:
        chosen, why = None, ""
        for candidate in line.failover:
            dest = places.get(candidate)
            if dest is None or candidate in gone:
                continue
            if dest.unlimited:
                chosen, why = (
                    dest,
                    f"{candidate} (self-service, unlimited)" if dest.kind != "site" else candidate,
                )
                break
            if left[candidate] >= line.agents:
                left[candidate] -= line.agents
                chosen = dest
                why = f"{candidate} ({line.agents} of its seats; {left[candidate]} left)"
                break
        if chosen is None:
            unserved.append(
                f"hotlines.{name}: no destination in {line.failover} can take it when"
                f" {' and '.join(sorted(gone))} {'is' if len(gone) == 1 else 'are'} lost"
                f" (needs {line.agents} agents); end its list with an ivr or announcement"
            )
            continue
        assignments.append(Assignment(name, line.number, chosen.name, chosen.kamailio_set, line.agents, why))
    return assignments, unserved


def _uri(config: Config, site: str) -> str:
    return f"sip:{config.sites[site].sbc}"


def failover_routing(config: Config, lost: Iterable[str] = ()) -> Routing:
    """Routing with the primary fenced and every hotline served by plan.

    ``lost``: backup sites that are down as well; their hotlines go to the
    next destination in each plan and their SBCs are fenced with the
    primary's. Sites still serving are (re-)enabled: one lost earlier and
    back now takes calls again.
    """
    primary_name = config.primary[0]
    gone = {primary_name, *lost} & set(config.sites)
    assignments, _ = assign(config, gone)
    default = serving_site(config, gone)
    if default is not None:
        default_set = config.sites[default].kamailio_set
    else:  # every backup site lost: numbers that are not hotlines go to self-service, if any
        selfservice = [d for d in destinations(config).values() if d.kind != "site" and d.unlimited]
        default_set = (
            selfservice[0].kamailio_set if selfservice else config.sites[backup_site(config)].kamailio_set
        )
    return Routing(
        name=routing_name(lost),
        serving_site=default or "none",
        default_set=default_set,
        hotlines={a.number: a.kamailio_set for a in assignments},
        # Fence the lost sites' SBCs wherever they are listed, not whole sets: a set that also
        # lists the backup keeps it, so a call already on its way is still retried there.
        fenced_uris=frozenset(_uri(config, site) for site in gone),
        active_uris=frozenset(_uri(config, site) for site in config.sites if site not in gone),
    )


def normal_routing(config: Config) -> Routing:
    """Every hotline to the primary's set (which keeps Kamailio's per-call failover).

    Every site's SBC is enabled again: a backup fenced while it was lost is
    the primary's per-call fallback once more (Kamailio's own probing still
    keeps a dead one out of the way).
    """
    primary_name, primary = config.primary
    return Routing(
        name="normal",
        serving_site=primary_name,
        default_set=primary.kamailio_set,
        hotlines={line.number: primary.kamailio_set for line in config.hotlines.values()},
        active_uris=frozenset(_uri(config, site) for site in config.sites),
    )


def routing_name(lost: Iterable[str] = ()) -> str:
    """``failover``, or ``failover-without:b,c`` when backup sites are lost too."""
    gone = sorted(set(lost))
    return "failover" if not gone else "failover-without:" + ",".join(gone)


def lost_from_name(name: str) -> tuple[str, ...] | None:
    """The inverse of :func:`routing_name`; None for a name that is not a failover routing."""
    if name == "failover":
        return ()
    if name.startswith("failover-without:"):
        return tuple(sorted(name.split(":", 1)[1].split(",")))
    return None


def known_routings(config: Config) -> dict[str, Routing]:
    """Every routing the engine can ask for: normal, and failover with each set of lost backups.

    A new leader reads the real routing back against these (``failover/etcd/fence.py``):
    with three sites that is four routings, with five, sixteen.
    """
    backups = backup_sites(config)
    found = {"normal": normal_routing(config)}
    for n in range(len(backups)):
        for lost in combinations(backups, n):
            routing = failover_routing(config, lost)
            found[routing.name] = routing
    return found


def problems(config: Config) -> list[str]:
    """Why the plan cannot be used as written (empty when it can)."""
    found = []
    places = destinations(config)
    numbers: dict[str, str] = {}
    for name, line in config.hotlines.items():
        if line.number in numbers:
            found.append(f"hotlines.{name}.number {line.number!r} is already hotlines.{numbers[line.number]}")
        numbers[line.number] = name
        for candidate in line.failover:
            if candidate not in places:
                found.append(
                    f"hotlines.{name}.failover: unknown destination {candidate!r}"
                    f" (known: {', '.join(sorted(places))})"
                )
    sets: dict[int, str] = {}  # the one check that every site and destination has its own set
    for name, dest in places.items():
        key = f"{'sites' if dest.kind == 'site' else 'destinations'}.{name}"
        if dest.kamailio_set in sets:
            found.append(
                f"{key}.kamailio_set {dest.kamailio_set} is already used by {sets[dest.kamailio_set]}:"
                " each site and destination needs its own dispatcher set"
            )
        sets[dest.kamailio_set] = key
    if not found:
        found += assign(config, config.primary[0])[1]
    return found


def warnings(config: Config) -> list[str]:
    """Hotlines left unserved when a backup site is lost with the primary (valid, but worth knowing)."""
    notes: list[str] = []
    primary = config.primary[0]
    backups = backup_sites(config)
    if len(backups) < 2:
        return notes
    for site in backups:
        for line in assign(config, {primary, site})[1]:
            notes.append(line.replace("; end its list", " too; end its list"))
    return notes
