"""What call routing should look like: the one description every actuator obeys.

The engine decides *which* routing is wanted; a :class:`Routing` says
*what* that means in terms every edge understands: which dispatcher set new
calls go to by default, which set each hotline (called number) goes to,
and which sets are fenced (disabled, so not even Kamailio's per-call
failover may pick them). Actuators translate it into their own world
(Kamailio htables and dispatcher states, a service address, a carrier's
redirect API) and read their world back to verify it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Routing:
    name: str  # "normal", "failover", …: for logs and hooks
    serving_site: str  # the site whose agents take calls by default
    default_set: int  # dispatcher set for numbers not in ``hotlines``
    hotlines: dict[str, int] = field(default_factory=dict)  # called number -> dispatcher set
    fenced_sets: frozenset[int] = frozenset()  # disabled: no call may be sent there
    active_sets: frozenset[int] = frozenset()  # explicitly re-enabled (e.g. at failback)
    # Destinations (SIP URIs) disabled in every set that lists them: the fenced site's SBC.
    # Finer than fencing a set: a set that also lists the backup keeps it as per-call fallback.
    fenced_uris: frozenset[str] = frozenset()
    active_uris: frozenset[str] = frozenset()  # re-enabled in every set that lists them

    @property
    def kind(self) -> str:
        """``normal`` or ``failover``, whichever backup sites a failover routing avoids.

        Actuators that only care which side serves (a service address, the
        replica's promotion) compare this, not the name.
        """
        return "failover" if self.name == "failover" or self.name.startswith("failover-") else self.name

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "serving_site": self.serving_site,
            "default_set": self.default_set,
            "hotlines": dict(sorted(self.hotlines.items())),
            "fenced_sets": sorted(self.fenced_sets),
            "active_sets": sorted(self.active_sets),
            "fenced_uris": sorted(self.fenced_uris),
            "active_uris": sorted(self.active_uris),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Routing:
        return cls(
            name=str(data["name"]),
            serving_site=str(data["serving_site"]),
            default_set=int(data["default_set"]),
            hotlines={str(k): int(v) for k, v in data.get("hotlines", {}).items()},
            fenced_sets=frozenset(int(s) for s in data.get("fenced_sets", [])),
            active_sets=frozenset(int(s) for s in data.get("active_sets", [])),
            fenced_uris=frozenset(str(u) for u in data.get("fenced_uris", [])),
            active_uris=frozenset(str(u) for u in data.get("active_uris", [])),
        )


def same_destination(uri: str, other: str) -> bool:
    """``sip:10.0.0.1:5060;transport=udp`` and ``sip:10.0.0.1:5060`` name the same SBC."""
    return uri.split(";", 1)[0].lower() == other.split(";", 1)[0].lower()
