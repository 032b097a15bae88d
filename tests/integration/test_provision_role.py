"""The hotsite_appliance role applied for real, over SSH, to a host in a network namespace.

The host is sshd in namespace hs-prov-<random> over a copy-on-write view of
this machine's root (tests/support/sshd_host.py): the role really creates the
user, the virtualenv from wheels built here (`pip wheel .`, installed with
--no-index), the checked config, the unit and the udev rule, and none of it
touches this machine. Then: the installed unit passes `systemd-analyze
verify`, a second run changes nothing, and a config the daemon would refuse
never replaces the one in place.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from appliance.cli.provision import provision
from provisioning.runner import run_playbook
from tests.conftest import REPO
from tests.support import sshd_host

pytestmark = [pytest.mark.skipif(sshd_host.available() is not None, reason=str(sshd_host.available()))]

CONFIG = {
    "appliance": {"name": "prov-test", "socket_group": "hotsite"},
    "metrics": {"listen": "127.0.0.1:9477"},
    "sites": {
        "primary": {"role": "primary", "sbc": "203.0.113.10:5060", "kamailio_set": 1},
        "backup": {"role": "backup", "sbc": "198.51.100.10:5060", "kamailio_set": 2},
    },
    "trunks": {"carrier-a": {"address": "192.0.2.21:5060", "carrier": "Carrier A"}},
    "contacts": [{"name": "Zhang Wei", "phone": "+8613800138000", "email": "zhang.wei@example.com"}],
    "channels": {
        "email": {
            "type": "smtp",
            "host": "smtp.example.com",
            "from_addr": "hotsite@example.com",
            "username": "hotsite",
            "password_file": "/etc/hotsite/secrets/smtp-password",
        },
    },
}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheels")
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", str(REPO), "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    print(f"pip wheel: {len(list(out.glob('*.whl')))} wheels in {time.monotonic() - started:.1f}s")
    return out


@pytest.fixture(scope="module")
def host() -> sshd_host.SshHost:
    h = sshd_host.SshHost()
    h.up()
    try:
        yield h
    finally:
        h.down()


def inventory(path: Path, h: sshd_host.SshHost, wheels: Path, config: dict) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "all": {
                    "children": {
                        "appliances": {
                            "hosts": {
                                "appliance": {
                                    "ansible_host": h.address,
                                    "ansible_user": "root",
                                    "ansible_ssh_private_key_file": str(h.key),
                                    "ansible_python_interpreter": "/usr/bin/python3",
                                    "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
                                    # udev is not installed on build machines; the image and real servers have it.
                                    "hotsite_apt_packages": ["python3-venv", "python3-apt"],
                                    "hotsite_service_start": False,
                                    "hotsite_wheel_dir": str(wheels),
                                    "hotsite_config": config,
                                    "hotsite_secrets": {"smtp-password": "s3cret-smtp\n"},
                                }
                            }
                        }
                    }
                }
            }
        )
    )
    return path


def test_role_installs_a_verified_appliance_and_a_second_run_changes_nothing(
    host: sshd_host.SshHost, wheels: Path, tmp_path: Path
) -> None:
    inv = inventory(tmp_path / "inventory.yml", host, wheels, CONFIG)
    lines = []
    started = time.monotonic()
    first = run_playbook(inv, playbook="appliance.yml", on_line=lines.append)
    print(f"first run: {time.monotonic() - started:.1f}s")
    assert first.ok, (first.progress.hosts["appliance"].errors, first.output_tail)
    assert first.progress.changed_hosts == ["appliance"]
    changed = first.progress.hosts["appliance"].changed_tasks
    assert any("systemd unit" in t for t in changed) and any("hotsite.toml" in t for t in changed)
    assert any(line.status == "changed" for line in lines)

    # What is on the host now.
    unit = host.ssh("systemd-analyze verify /etc/systemd/system/hotsite.service")
    assert unit.returncode == 0, unit.stderr
    assert (
        host.path("/etc/systemd/system/hotsite.service").read_text()
        == (REPO / "images/systemd/hotsite.service").read_text()
    )
    assert host.path("/etc/systemd/system/multi-user.target.wants/hotsite.service").is_symlink()
    version = host.ssh("/opt/hotsite/bin/hotsite --version")
    assert version.returncode == 0 and "hotsite" in version.stdout
    check = host.ssh("/opt/hotsite/bin/hotsite config check /etc/hotsite/hotsite.toml")
    assert check.returncode == 0, check.stderr
    stat = host.ssh(
        "stat -c '%n %U:%G %a' /etc/hotsite/hotsite.toml /etc/hotsite/secrets/smtp-password "
        "/var/lib/hotsite /var/log/hotsite /etc/udev/rules.d/99-hotsite-modem.rules; id -nG hotsite"
    )
    assert stat.stdout.split("\n")[:6] == [
        "/etc/hotsite/hotsite.toml root:hotsite 640",
        "/etc/hotsite/secrets/smtp-password root:hotsite 640",
        "/var/lib/hotsite hotsite:hotsite 750",
        "/var/log/hotsite hotsite:hotsite 750",
        "/etc/udev/rules.d/99-hotsite-modem.rules root:root 644",
        "hotsite dialout",
    ], stat.stdout
    assert (
        'SYMLINK+="hotsite-modem", GROUP="hotsite", MODE="0660"'
        in host.path("/etc/udev/rules.d/99-hotsite-modem.rules").read_text()
    )
    freeze = host.ssh("/opt/hotsite/bin/python -m pip freeze").stdout
    assert "hotsite==0.1.0" in freeze or "hotsite @" in freeze

    # The second run, through the CLI: nothing changes.
    started = time.monotonic()
    result = CliRunner().invoke(provision, ["--inventory", str(inv), "--playbook", "appliance.yml", "--json"])
    print(f"second run: {time.monotonic() - started:.1f}s")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["changed_hosts"] == [], summary
    assert summary["hosts"]["appliance"]["changed"] == 0 and summary["hosts"]["appliance"]["ok"] > 10


def test_a_config_the_daemon_would_refuse_is_never_put_in_place(
    host: sshd_host.SshHost, wheels: Path, tmp_path: Path
) -> None:
    before = host.ssh("sha256sum /etc/hotsite/hotsite.toml").stdout
    assert before, "the first test installs the config"
    bad = {**CONFIG, "probes": {"interval_s": 1.0, "timout_s": 0.5}}  # a misspelt key
    inv = inventory(tmp_path / "inventory.yml", host, wheels, bad)
    result = run_playbook(inv, playbook="appliance.yml", tags="hotsite_config")
    assert not result.ok
    errors = result.progress.hosts["appliance"].errors
    assert len(errors) == 1 and "hotsite.toml" in errors[0], errors
    assert host.ssh("sha256sum /etc/hotsite/hotsite.toml").stdout == before


def test_a_missing_inventory_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(provision, ["--inventory", str(tmp_path / "nope.yml")])
    assert result.exit_code == 2
    assert "does not exist" in result.output
