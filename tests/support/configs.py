"""One builder of valid ``hotsite.toml`` texts for the tests, instead of the same base copied into each file.

Every config needs one primary and one backup site; most tests add a section
or two to that and look at what the loader says. ``two_sites()`` is that
base, ``valid(...)`` the base plus sections, ``parse(...)`` the loaded
:class:`~appliance.config.Config`, and :data:`DAEMON` the template the
integration tests start a real daemon on (state, runtime dir and ports are
filled in per test).
"""

from __future__ import annotations

from appliance import config


def two_sites(primary_sbc: str = "10.0.0.1:5060", backup_sbc: str = "10.0.0.2") -> str:
    """``[sites.primary]`` (Kamailio set 1) and ``[sites.backup]`` (set 2), nothing else."""
    return f"""
[sites.primary]
role = "primary"
sbc = "{primary_sbc}"
kamailio_set = 1

[sites.backup]
role = "backup"
sbc = "{backup_sbc}"
kamailio_set = 2
"""


TWO_SITES = two_sites()


def valid(*sections: str, primary_sbc: str = "10.0.0.1:5060", backup_sbc: str = "10.0.0.2") -> str:
    """The two sites followed by ``sections`` (TOML text, each ending in a newline)."""
    return two_sites(primary_sbc, backup_sbc) + "".join(sections)


def parse(*sections: str, primary_sbc: str = "10.0.0.1:5060", backup_sbc: str = "10.0.0.2") -> config.Config:
    return config.parse(valid(*sections, primary_sbc=primary_sbc, backup_sbc=backup_sbc))


# For str.format(state=, run=, metrics_port=, sbc_port=): a daemon with fast probes whose SBCs
# are a closed loopback port (both sites judged down within a second).
DAEMON = """
[appliance]
name = "test"
state_dir = "{state}"
runtime_dir = "{run}"

[metrics]
listen = "127.0.0.1:{metrics_port}"

[probes]
interval_s = 0.2
timeout_s = 0.15
rise = 1
fall = 2
""" + two_sites("127.0.0.1:{sbc_port}", "127.0.0.1:{sbc_port}")


# Pieces for the configs that plan hotlines: sites with seats, destinations, hotlines. Each
# returns its TOML table (ending in a newline) so a test's config reads as what it is made of.


def site(name: str, role: str, sbc: str, kamailio_set: int, seats: int | None = None) -> str:
    """``[sites.<name>]``; ``seats`` only when given (plans need it, probes do not)."""
    text = f'[sites.{name}]\nrole = "{role}"\nsbc = "{sbc}"\nkamailio_set = {kamailio_set}\n'
    return text + (f"seats = {seats}\n" if seats is not None else "")


def destination(name: str, kind: str, kamailio_set: int, capacity: int | None = None) -> str:
    """``[destinations.<name>]`` (an IVR, remote agents...), ``capacity`` only when given."""
    text = f'[destinations.{name}]\nkind = "{kind}"\nkamailio_set = {kamailio_set}\n'
    return text + (f"capacity = {capacity}\n" if capacity is not None else "")


def hotline(name: str, number: str, *, agents: int, failover: list[str], priority: int | None = None) -> str:
    """``[hotlines.<name>]``: its number, agents needed and where it fails over to, in order."""
    text = f'[hotlines.{name}]\nnumber = "{number}"\n'
    text += f"priority = {priority}\n" if priority is not None else ""
    targets = ", ".join(f'"{t}"' for t in failover)
    return text + f"agents = {agents}\nfailover = [{targets}]\n"


# A primary of 100 seats, a backup of 50 and an IVR (set 3): what the failover service plans on.
SEATED_SITES = (
    site("primary", "primary", "10.0.0.1", 1, seats=100)
    + site("backup", "backup", "10.0.1.1", 2, seats=50)
    + destination("ivr", "ivr", 3)
)

# Operator confirmation, a 10 s hold-down: the failover section the service tests run under.
CONFIRM_FAILOVER = '[failover]\npolicy = "confirm"\nhold_down_s = 10\n'


def three_hotlines(vip_and_cards: list[str], loans: list[str]) -> str:
    """The planning tests' three hotlines: vip (95588, priority 1) and cards (95566, 2), 60 agents
    each, failing over to ``vip_and_cards``; loans (95577, 3), 40 agents, to ``loans``."""
    return (
        hotline("vip", "95588", priority=1, agents=60, failover=vip_and_cards)
        + hotline("cards", "95566", priority=2, agents=60, failover=vip_and_cards)
        + hotline("loans", "95577", priority=3, agents=40, failover=loans)
    )
