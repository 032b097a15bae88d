"""The unit a configuration needs: `hotsite config check --unit` and `hotsite unit render`.

A unit whose sandbox forbids a configured feature does not fail at start but
when that feature is first used (the netlink actuator's gratuitous ARP in a
failover). These tests hold the checker to naming the unit setting to change,
and the renderer to producing a unit the checker accepts.
"""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance import config, systemd_unit
from appliance.cli.main import cli
from tests.conftest import REPO
from tests.support import configs

# images/systemd/hotsite.service as shipped before issue 18: the regression fixture.
OLD_UNIT = """\
[Unit]
Description=hotsite disaster-recovery site appliance
[Service]
Type=notify
ExecStart=/opt/hotsite/bin/hotsite --config /etc/hotsite/hotsite.toml run
User=hotsite
Group=hotsite
SupplementaryGroups=dialout
AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW
NoNewPrivileges=yes
StateDirectory=hotsite
RuntimeDirectory=hotsite
ConfigurationDirectory=hotsite
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
DeviceAllow=char-ttyUSB rw
DeviceAllow=char-ttyACM rw
"""

SITES = configs.TWO_SITES

NETLINK = """
[actuators.vip]
type = "netlink"
address = "192.0.2.10/24"
interface = "eth1"
"""

KAMAILIO = """
[actuators.kamailio]
type = "kamailio"

[kamailio]
rpc_url = "http://192.0.2.20:5071/RPC"
dispatcher_list = "/etc/kamailio/dispatcher.list"
"""


def unit_problems(unit_text: str, config_text: str) -> list[str]:
    return systemd_unit.check(systemd_unit.parse_unit(unit_text), config.parse(SITES + config_text))


def test_a_netlink_actuator_against_the_old_unit_is_refused_naming_af_packet() -> None:
    found = unit_problems(OLD_UNIT, NETLINK)
    assert len(found) == 1, found
    assert found[0].startswith("actuators.vip (type netlink) sends gratuitous ARP")
    assert "RestrictAddressFamilies=" in found[0] and "add AF_PACKET" in found[0]


def test_without_gratuitous_arp_no_packet_socket_is_needed() -> None:
    assert unit_problems(OLD_UNIT, NETLINK + "garp_count = 0\n") == []


def test_a_dispatcher_list_outside_read_write_paths_is_refused_naming_the_directory() -> None:
    found = unit_problems(OLD_UNIT, KAMAILIO)
    assert found == [
        "kamailio.dispatcher_list: /etc/kamailio/dispatcher.list is replaced through a temporary file"
        " in /etc/kamailio (with its .token file); ProtectSystem=strict makes /etc/kamailio read-only:"
        " add ReadWritePaths=/etc/kamailio to the unit"
    ]
    # Naming the file alone would not do: the temporary file is made beside it.
    assert unit_problems(OLD_UNIT + "ReadWritePaths=/etc/kamailio/dispatcher.list\n", KAMAILIO) == found
    assert unit_problems(OLD_UNIT + "ReadWritePaths=/etc/kamailio\n", KAMAILIO) == []


def test_replicas_outside_the_state_directory_and_in_a_private_tmp() -> None:
    streams = """
[replication]
source_agent = "10.0.0.1"
tls_cert_file = "/etc/hotsite/tls/a.crt"
tls_key_file = "/etc/hotsite/secrets/a.key"
tls_ca_file = "/etc/hotsite/tls/ca.crt"
[replication.streams.inside]
kind = "sqlite"
source = "customers"
replica = "/var/lib/hotsite/replicas/customers.db"
[replication.streams.srv]
kind = "files"
source = "dialplans"
replica = "/srv/dr/dialplans"
[replication.streams.tmp]
kind = "files"
source = "ivr"
replica = "/tmp/ivr/prompts"
"""
    found = unit_problems(OLD_UNIT, streams)
    assert len(found) == 2, found
    assert found[0].startswith("replication.streams.srv.replica: /srv/dr/dialplans and its")
    assert found[0].endswith(
        "ProtectSystem=strict makes /srv/dr read-only: add ReadWritePaths=/srv/dr to the unit"
    )
    assert found[1].startswith("replication.streams.tmp.replica:") and "PrivateTmp=yes" in found[1]


def test_capabilities_are_named_in_the_set_that_lacks_them() -> None:
    narrowed = (
        OLD_UNIT.replace("CAP_NET_ADMIN CAP_NET_RAW", "CAP_NET_RAW") + "RestrictAddressFamilies=AF_PACKET\n"
    )
    found = unit_problems(narrowed, NETLINK)
    assert len(found) == 2, found
    assert "needs CAP_NET_ADMIN, which the unit's CapabilityBoundingSet= leaves out" in found[0]
    assert "needs CAP_NET_ADMIN, which User=hotsite only has through AmbientCapabilities=" in found[1]
    # A later empty assignment resets a list: the drop-in's way of taking everything away.
    assert any(
        "AF_NETLINK" in p
        for p in unit_problems(OLD_UNIT + "RestrictAddressFamilies=\nRestrictAddressFamilies=AF_UNIX\n", "")
    )
    assert unit_problems(OLD_UNIT + "RestrictAddressFamilies=\n", NETLINK) == []


def test_a_modem_the_device_policy_does_not_allow(tmp_path: Path) -> None:
    leader, follower = os.openpty()
    try:
        pty = os.ttyname(follower)
        modem = f'[channels.sms]\ntype = "gsm"\ndevice = "{pty}"\n'
        # A pty (the modem emulator's) is one of the devices DevicePolicy=closed allows itself.
        assert unit_problems(OLD_UNIT + "DevicePolicy=closed\n", modem) == []
        found = unit_problems(OLD_UNIT + "DevicePolicy=strict\n", modem)
        assert len(found) == 1 and found[0].startswith(f"channels.sms.device: the modem {pty}"), found
        assert "add DeviceAllow=char-pts rw" in found[0]
        assert unit_problems(OLD_UNIT + "DevicePolicy=strict\nDeviceAllow=char-pts rw\n", modem) == []
        assert len(unit_problems(OLD_UNIT + "DevicePolicy=strict\nDeviceAllow=char-pts r\n", modem)) == 1
    finally:
        os.close(leader)
        os.close(follower)
    # A USB modem not plugged in: judged by its name.
    usb = '[channels.sms]\ntype = "gsm"\ndevice = "/dev/ttyACM7"\n'
    assert unit_problems(OLD_UNIT, usb) == []
    found = unit_problems(OLD_UNIT.replace("DeviceAllow=char-ttyACM rw\n", ""), usb)
    assert found and "add DeviceAllow=char-ttyACM rw" in found[0], found


def test_drop_ins_are_read_after_the_unit(tmp_path: Path) -> None:
    unit = tmp_path / "hotsite.service"
    unit.write_text(OLD_UNIT)
    cfg = config.parse(SITES + NETLINK + KAMAILIO)
    assert len(systemd_unit.check_file(unit, cfg)) == 2
    (tmp_path / "hotsite.service.d").mkdir()
    (tmp_path / "hotsite.service.d/10-failover.conf").write_text(
        "[Service]\nRestrictAddressFamilies=AF_PACKET\nReadWritePaths=-/etc/kamailio\n"
    )
    assert systemd_unit.check_file(unit, cfg) == []


def test_on_the_host_a_missing_read_write_path_or_a_directory_the_user_cannot_write(tmp_path: Path) -> None:
    """check_host judges this host's directories: run where the unit runs (the role does)."""
    lists = tmp_path / "kamailio"
    cfg = config.parse(SITES + KAMAILIO.replace("/etc/kamailio", str(lists)))
    unit = systemd_unit.parse_unit(
        OLD_UNIT.replace("User=hotsite", "User=nobody") + f"ReadWritePaths={lists}\n"
    )
    found = systemd_unit.check_host(unit, cfg)
    assert found[0] == (
        f"ReadWritePaths={lists}: {lists} does not exist here, so the unit would not start"
        f" (status 226/NAMESPACE); create it, or write ReadWritePaths=-{lists}"
    )
    # The daemon would have to make the directory: judged by the nearest one that exists.
    assert f"{tmp_path} is root:root mode 0700, which User=nobody cannot write" in found[1], found
    lists.mkdir(mode=0o755)
    found = systemd_unit.check_host(unit, cfg)
    assert len(found) == 1 and found[0].startswith("kamailio.dispatcher_list:"), found
    assert f"{lists} is root:root mode 0755, which User=nobody cannot write" in found[0]
    os.chown(lists, pwd.getpwnam("nobody").pw_uid, -1)
    assert systemd_unit.check_host(unit, cfg) == []


def test_the_rendered_unit_passes_its_own_check_and_grants_only_what_is_needed() -> None:
    for extra in ("", NETLINK, KAMAILIO, NETLINK + "garp_count = 0\n"):
        cfg = config.parse(SITES + extra)
        text = systemd_unit.render(cfg)
        assert systemd_unit.check(systemd_unit.parse_unit(text), cfg) == [], (extra, text)
    bare = systemd_unit.parse_unit(systemd_unit.render(config.parse(SITES)))
    assert bare.values("CapabilityBoundingSet") == [] and "AmbientCapabilities" not in bare.settings
    assert bare.values("RestrictAddressFamilies") == ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]
    assert "ReadWritePaths" not in bare.settings and "DeviceAllow" not in bare.settings
    # Elsewhere than one level under /var/lib and /run: listed as paths.
    moved = config.parse('[appliance]\nstate_dir = "/srv/hotsite/state"\n' + SITES)
    unit = systemd_unit.parse_unit(systemd_unit.render(moved))
    assert unit.values("ReadWritePaths") == ["/srv/hotsite/state"] and "StateDirectory" not in unit.settings


def test_the_shipped_unit_is_the_render_of_the_example_config_and_passes() -> None:
    example = config.load(REPO / "appliance/examples/hotsite.example.toml")
    shipped = REPO / "images/systemd/hotsite.service"
    assert systemd_unit.check(systemd_unit.read_unit(shipped), example) == []
    regenerate = "hotsite -c /etc/hotsite/hotsite.toml unit render (with the example config there)"
    assert shipped.read_text() == systemd_unit.render(example), regenerate


def test_config_check_with_unit_exits_2_naming_the_setting(tmp_path: Path) -> None:
    cfg = tmp_path / "hotsite.toml"
    cfg.write_text(SITES + NETLINK)
    unit = tmp_path / "hotsite.service"
    unit.write_text(OLD_UNIT)
    runner = CliRunner()
    result = runner.invoke(cli, ["config", "check", str(cfg), "--unit", str(unit)])
    assert result.exit_code == 2, result.output
    assert f"unit {unit}: actuators.vip (type netlink)" in result.output
    assert "RestrictAddressFamilies=" in result.output
    as_json = runner.invoke(cli, ["--config", str(cfg), "config", "check", "--unit", str(unit), "--json"])
    assert as_json.exit_code == 2 and not json.loads(as_json.output)["ok"]
    rendered = tmp_path / "rendered.service"
    made = runner.invoke(cli, ["--config", str(cfg), "unit", "render", "-o", str(rendered)])
    assert made.exit_code == 0, made.output
    assert f"--config {cfg} run" in rendered.read_text()
    ok = runner.invoke(cli, ["config", "check", str(cfg), "--unit", str(rendered)])
    assert ok.exit_code == 0, ok.output
    missing = runner.invoke(cli, ["config", "check", str(cfg), "--unit", str(tmp_path / "nope.service")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


@pytest.mark.parametrize("bad", ["[sites.x]\n", "not toml ["])
def test_unit_render_of_a_bad_config_is_a_config_error(tmp_path: Path, bad: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(bad)
    result = CliRunner().invoke(cli, ["--config", str(cfg), "unit", "render"])
    assert result.exit_code == 2 and "hotsite: error:" in result.output
