"""The lab's hosts, addresses and ports, in one place.

Everything else (namespace plumbing, process launch, the Kamailio config, the
tests, the demo) reads these constants, so changing an address or a port here
changes the whole lab.  Two address plans exist: the namespace plan (a /24 on
a bridge) and the loopback fallback plan (127.77.0.x, all of which Linux
answers on ``lo`` without configuration).
"""

from __future__ import annotations

from dataclasses import dataclass, field

NS_PREFIX = "hs-lab-"
CORE_NS = f"{NS_PREFIX}core"
BRIDGE = "br0"
HOST_IFACE = "eth0"

APPLIANCE_IFACE = "hs-appl"
APPLIANCE_PEER = "appl"  # the appliance's veth end inside the core namespace
PREFIX_LEN = 24
NETNS_APPLIANCE_ADDR = "10.77.0.2"
LOOPBACK_APPLIANCE_ADDR = "127.0.0.1"

SIP_PORT = 5060
RPC_PORT = 5071
HTTP_PORT = 8080
RPC_PATH = "/RPC"

# Dispatcher set ids in the generated Kamailio config.
SET_PRIMARY = 1
SET_BACKUP = 2


@dataclass(frozen=True)
class Host:
    """One simulated machine: a namespace of its own (or a loopback address)."""

    name: str
    role: str
    netns_addr: str
    loopback_addr: str
    # What runs there: "kamailio", "sipp" (the UAS scenario), "healthd", "witness" (hotsite witness).
    services: tuple[str, ...] = field(default_factory=tuple)

    @property
    def namespace(self) -> str:
        return f"{NS_PREFIX}{self.name}"

    @property
    def core_iface(self) -> str:
        """The host's veth end on the bridge, in the core namespace (<= 15 chars)."""
        return f"v-{self.name}"[:15]

    def ports(self) -> dict[str, int]:
        ports: dict[str, int] = {}
        if "kamailio" in self.services:
            ports["sip"] = SIP_PORT
            ports["rpc"] = RPC_PORT
        if "sipp" in self.services:
            ports["sip"] = SIP_PORT
        if "healthd" in self.services or "witness" in self.services:
            ports["http"] = HTTP_PORT
        return ports

    def address(self, mode: str) -> str:
        return self.netns_addr if mode == "netns" else self.loopback_addr


HOSTS: tuple[Host, ...] = (
    Host("carrier", "carrier-edge", "10.77.0.10", "127.77.0.10", ("kamailio",)),
    Host("trunk-a", "trunk", "10.77.0.11", "127.77.0.11", ("sipp",)),
    Host("trunk-b", "trunk", "10.77.0.12", "127.77.0.12", ("sipp",)),
    Host("primary", "primary-sbc", "10.77.0.20", "127.77.0.20", ("sipp", "healthd")),
    Host("backup", "backup-sbc", "10.77.0.30", "127.77.0.30", ("sipp",)),
    Host("witness", "witness", "10.77.0.40", "127.77.0.40", ("witness",)),
)

HOSTS_BY_NAME: dict[str, Host] = {h.name: h for h in HOSTS}


def host(name: str) -> Host:
    """Look a host up by name; KeyError names the known hosts."""
    try:
        return HOSTS_BY_NAME[name]
    except KeyError:
        known = ", ".join(HOSTS_BY_NAME)
        raise KeyError(f"unknown lab host {name!r} (known: {known})") from None
