"""The image recipe and the Vagrantfile.

The Vagrantfile is validated by Vagrant itself when it is installed (Debian
`vagrant`), else only parsed by Ruby. The root filesystem build (debootstrap
from the Debian mirror, then the role through Ansible's chroot connection)
takes minutes and the network: it runs only with HOTSITE_SLOW_TESTS=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO


def test_vagrantfile_is_valid() -> None:
    if shutil.which("vagrant"):
        cmd = ["vagrant", "validate", "--ignore-provider"]
    elif shutil.which("ruby"):
        cmd = ["ruby", "-c", "Vagrantfile"]
    else:
        pytest.skip("neither vagrant nor ruby is installed")
    result = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_firstboot_unit_and_script_are_well_formed(tmp_path: Path) -> None:
    subprocess.run(["sh", "-n", str(REPO / "images/firstboot/hotsite-firstboot")], check=True)
    subprocess.run(["sh", "-n", str(REPO / "images/build-rootfs.sh")], check=True)
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # Verify the unit against a stand-in for the script it runs (not installed on this machine).
    unit = (REPO / "images/firstboot/hotsite-firstboot.service").read_text()
    stand_in = tmp_path / "hotsite-firstboot"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    (tmp_path / "hotsite-firstboot.service").write_text(
        unit.replace("/usr/local/sbin/hotsite-firstboot", str(stand_in))
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "hotsite-firstboot.service")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("HOTSITE_SLOW_TESTS") != "1", reason="set HOTSITE_SLOW_TESTS=1 (minutes, network)"
)
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("debootstrap") is None, reason="needs root and debootstrap"
)
@pytest.mark.timeout(1200)
def test_rootfs_builds_with_the_role_applied(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(REPO), "-w", str(wheels)], check=True)
    vars_file = tmp_path / "vars.yml"
    vars_file.write_text(
        yaml.safe_dump(
            {
                "hotsite_config": {
                    "appliance": {"name": "image"},
                    "sites": {
                        "primary": {"role": "primary", "sbc": "203.0.113.10:5060", "kamailio_set": 1},
                        "backup": {"role": "backup", "sbc": "198.51.100.10:5060", "kamailio_set": 2},
                    },
                }
            }
        )
    )
    started = time.monotonic()
    result = subprocess.run(
        [str(REPO / "images/build-rootfs.sh"), str(tmp_path / "out"), str(wheels), str(vars_file)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(f"rootfs build: {time.monotonic() - started:.0f}s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    root = tmp_path / "out/rootfs"
    assert (root / "opt/hotsite/bin/hotsite").exists()
    assert (root / "etc/systemd/system/multi-user.target.wants/hotsite.service").is_symlink()
    assert (root / "etc/systemd/system/multi-user.target.wants/hotsite-firstboot.service").is_symlink()
    verify = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/hotsite.service"],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
