"""Per-hotline plans: which called number goes where when the primary is lost.

A bank's call centre has one number per product line or customer tier, and
the backup site has fewer seats than the primary. So a failover is not "send
everything to the backup": hotlines are served in priority order, each by
the first destination in its preference list that still has the agents it
needs (a site's seats, a remote-agent pool), and the rest fall through to
self-service (an IVR or an announcement, capacity 0 = unlimited).

Pure: :func:`failover_routing` and :func:`normal_routing` compute a
:class:`~failover.routing.Routing` from the configuration; :func:`problems`
lists what makes a plan unusable (the config check reports them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from failover.routing import Routing

if TYPE_CHECKING:
    from appliance.config import Config


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


def backup_site(config: Config) -> str:
    return next(name for name, site in config.sites.items() if site.role == "backup")


def assign(config: Config, lost: str) -> tuple[list[Assignment], list[str]]:
    """Serve hotlines by priority from what is left when site ``lost`` is gone.

    Returns the assignments and, for hotlines nothing could take, one
    problem line each.
    """
    places = destinations(config)
    left = {name: d.capacity for name, d in places.items()}
    assignments, unserved = [], []
    ordered = sorted(config.hotlines.items(), key=lambda item: (item[1].priority, item[0]))
    for name, line in ordered:
        chosen, why = None, ""
        for candidate in line.failover:
            dest = places.get(candidate)
            if dest is None or candidate == lost:
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
                f"hotlines.{name}: no destination in {line.failover} can take it when {lost} is lost"
                f" (needs {line.agents} agents); end its list with an ivr or announcement"
            )
            continue
        assignments.append(Assignment(name, line.number, chosen.name, chosen.kamailio_set, line.agents, why))
    return assignments, unserved


def failover_routing(config: Config) -> Routing:
    """Routing with the primary fenced and every hotline served by plan."""
    primary_name, primary = config.primary
    backup = config.sites[backup_site(config)]
    assignments, _ = assign(config, primary_name)
    return Routing(
        name="failover",
        serving_site=backup_site(config),
        default_set=backup.kamailio_set,
        hotlines={a.number: a.kamailio_set for a in assignments},
        # Fence the primary's SBC wherever it is listed, not whole sets: a set that also
        # lists the backup keeps it, so a call already on its way is still retried there.
        fenced_uris=frozenset({f"sip:{primary.sbc}"}),
    )


def normal_routing(config: Config) -> Routing:
    """Every hotline to the primary's set (which keeps Kamailio's per-call failover)."""
    primary_name, primary = config.primary
    return Routing(
        name="normal",
        serving_site=primary_name,
        default_set=primary.kamailio_set,
        hotlines={line.number: primary.kamailio_set for line in config.hotlines.values()},
        active_uris=frozenset({f"sip:{primary.sbc}"}),
    )


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
    sets: dict[int, str] = {}
    for name, dest in places.items():
        if dest.kamailio_set in sets:
            found.append(
                f"{name}: kamailio_set {dest.kamailio_set} is already used by {sets[dest.kamailio_set]}"
            )
        sets[dest.kamailio_set] = name
    if not found:
        found += assign(config, config.primary[0])[1]
    return found
