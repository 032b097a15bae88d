"""The [actuators.*] keys: each mistake named, and the factory building what the config says."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import config
from appliance.errors import ConfigError
from failover.actuators.factory import build_actuators
from failover.actuators.hook import HookActuator
from failover.actuators.kamailio import KamailioActuator
from failover.actuators.netlink import NetlinkActuator
from tests.support import configs

BASE = configs.TWO_SITES


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config.parse(BASE + text)
    assert info.value.exit_code == 2
    return info.value.problems


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            '[actuators.x]\ntype = "bgp"\n',
            "actuators.x.type: 'bgp': Input tag 'bgp' found using 'type' does not match any of the expected tags: 'kamailio', 'netlink', 'hook'",
        ),
        (
            '[actuators.k]\ntype = "kamailio"\ntoken = 1\n',
            "actuators.k.token: unknown key (known keys here: fenced_table, probing, timeout_s, token_file, type)",
        ),
        (
            '[actuators.k]\ntype = "kamailio"\ntimeout_s = 0\n',
            "actuators.k.timeout_s: 0: expected greater than or equal to 0.1",
        ),
        (
            '[actuators.k]\ntype = "kamailio"\nprobing = "maybe"\n',
            "actuators.k.probing: 'maybe': expected a valid boolean",
        ),
        (
            '[actuators.n]\ntype = "netlink"\naddress = "2001:db8::1"\ninterface = "eth0"\n',
            "actuators.n.address: '2001:db8::1': only IPv4 service addresses are supported",
        ),
        (
            '[actuators.n]\ntype = "netlink"\naddress = "10.0.0.300"\ninterface = "eth0"\n',
            "actuators.n.address: '10.0.0.300': expected an IPv4 address with optional /prefix",
        ),
        (
            '[actuators.n]\ntype = "netlink"\naddress = "10.0.0.3"\ninterface = "eth0"\nserve_on = "backup"\n',
            "actuators.n.serve_on: 'backup': expected 'failover' or 'normal'",
        ),
        (
            '[actuators.n]\ntype = "netlink"\naddress = "10.0.0.3"\ninterface = "eth0"\ngarp_count = 1000\n',
            "actuators.n.garp_count: 1000: expected less than or equal to 100",
        ),
        (
            '[actuators.n]\ntype = "netlink"\naddress = "10.0.0.3"\ninterface = "eth0"\nroutes = ["10.9.0.0/16 through 10.0.0.1"]\n',
            "actuators.n.routes[0]: '10.9.0.0/16 through 10.0.0.1': expected 'PREFIX' or 'PREFIX via GATEWAY'",
        ),
        (
            '[actuators.n]\ntype = "netlink"\naddress = "10.0.0.3"\ninterface = "eth0"\nroutes = ["10.9.0.1/16"]\n',
            "actuators.n.routes[0]: '10.9.0.1/16': 10.9.0.1/16 has host bits set (IPv4 only)",
        ),
        ('[actuators.h]\ntype = "hook"\n', "actuators.h: give exactly one of command (argv list) or url"),
        (
            '[actuators.h]\ntype = "hook"\ncommand = ["x"]\nurl = "http://a/"\n',
            "actuators.h: give exactly one of command (argv list) or url",
        ),
        (
            '[actuators.h]\ntype = "hook"\nurl = "ftp://a/"\n',
            "actuators.h.url: 'ftp://a/': expected an http:// or https:// URL",
        ),
    ],
)
def test_each_mistake_is_named(extra: str, expected: str) -> None:
    found = problems(extra)
    assert any(line.startswith(expected) for line in found), found


def test_the_factory_builds_every_type_in_config_order(tmp_path: Path) -> None:
    cfg = config.parse(
        BASE
        + f"""
[kamailio]
rpc_socket = "{tmp_path}/kamailio.sock"
dispatcher_list = "{tmp_path}/dispatcher.list"

[actuators.edge]
type = "kamailio"
probing = false

[actuators.vip]
type = "netlink"
address = "192.0.2.10/24"
interface = "eth1"
garp_count = 3

[actuators.carrier]
type = "hook"
command = ["/usr/local/bin/redirect", "--carrier", "x"]
timeout_s = 4
"""
    )
    built = build_actuators(cfg)
    assert [type(a) for a in built] == [KamailioActuator, NetlinkActuator, HookActuator]
    assert [a.name for a in built] == ["edge", "vip", "carrier"]
    kam, vip, hook = built
    assert (
        isinstance(kam, KamailioActuator)
        and isinstance(vip, NetlinkActuator)
        and isinstance(hook, HookActuator)
    )
    assert kam.rpc.socket_path == tmp_path / "kamailio.sock" and not kam.probing
    assert kam.token_file == tmp_path / "dispatcher.list.token"
    assert (str(vip.address), vip.interface, vip.garp_count, vip.serve_on) == (
        "192.0.2.10/24",
        "eth1",
        3,
        "failover",
    )
    assert hook.command == ["/usr/local/bin/redirect", "--carrier", "x"] and hook.timeout_s == 4


def test_a_kamailio_actuator_without_a_way_to_reach_kamailio_is_a_config_error() -> None:
    cfg = config.parse(BASE + '[actuators.edge]\ntype = "kamailio"\n')
    with pytest.raises(
        ConfigError, match="actuators.edge: type 'kamailio' needs kamailio.rpc_url or kamailio.rpc_socket"
    ):
        build_actuators(cfg)


def test_an_unknown_type_built_in_code_names_the_known_ones() -> None:
    cfg = config.parse(BASE)
    bogus = cfg.model_copy(
        update={"actuators": {"odd": config.KamailioActuatorSettings.model_construct(type="bgp")}}
    )
    with pytest.raises(
        ConfigError, match=r"actuators.odd.type: unknown type 'bgp' \(known: hook, kamailio, netlink\)"
    ):
        build_actuators(bogus)
