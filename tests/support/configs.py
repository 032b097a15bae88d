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
