"""The image recipe and the Vagrantfile.

The Vagrantfile is validated by Vagrant itself when it is installed (Debian
`vagrant`), else only parsed by Ruby. The image (debootstrap from the Debian
mirror, the role through hotsite's chroot connection, packed into a GPT disk)
is built and then booted under QEMU (TCG, UEFI firmware from OVMF, serial
console) with a first-boot file on its EFI partition, the way a technician
prepares a server: minutes and the network, so only with HOTSITE_SLOW_TESTS=1.
Debian's qemu-system-x86, ovmf, fdisk, mtools and dosfstools are installed
by that test when missing (not by `make deps`: no one else needs them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port


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
    for script in ("build-rootfs.sh", "build-disk.sh", "kernel-hook/zz-hotsite-esp"):
        subprocess.run(["sh", "-n", str(REPO / "images" / script)], check=True)
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


@pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("sfdisk", "mcopy", "mkfs.vfat", "debugfs")),
    reason="needs fdisk, mtools, dosfstools and e2fsprogs (Debian; not in `make deps`)",
)
def test_the_disk_is_a_gpt_with_an_esp_booting_the_newest_kernel_of_the_tree_by_partuuid(
    tmp_path: Path,
) -> None:
    """build-disk.sh on a stand-in tree (no debootstrap): the layout, the boot entry and fstab agree."""
    root = tmp_path / "root"
    for path, content in {
        "usr/lib/systemd/boot/efi/systemd-bootx64.efi": "systemd-boot",
        "boot/vmlinuz-6.1.0-9-amd64": "old kernel",
        "boot/initrd.img-6.1.0-9-amd64": "old initramfs",
        "boot/vmlinuz-6.1.0-10-amd64": "new kernel",  # newer by version, not by name
        "boot/initrd.img-6.1.0-10-amd64": "new initramfs",
    }.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(content)
    (root / "etc").mkdir()
    disk = tmp_path / "hotsite.img"
    subprocess.run(
        [str(REPO / "images/build-disk.sh"), str(root), str(disk)],
        check=True,
        capture_output=True,
        env={**os.environ, "ESP_MIB": "40", "ROOT_FREE_MIB": "8"},
    )
    table = json.loads(subprocess.run(["sfdisk", "-J", str(disk)], capture_output=True, text=True).stdout)
    esp, rootp = table["partitiontable"]["partitions"]
    assert (esp["type"], esp["start"], esp["size"]) == (
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
        2048,
        40 * 2048,
    )
    assert rootp["type"] == "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" and rootp["start"] == 2048 + 40 * 2048

    def esp_file(name: str) -> str:
        return subprocess.run(
            ["mtype", "-i", f"{disk}@@1M", f"::{name}"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
        ).stdout

    assert esp_file("/EFI/BOOT/BOOTX64.EFI") == "systemd-boot"
    assert (esp_file("/hotsite/vmlinuz"), esp_file("/hotsite/initrd.img")) == ("new kernel", "new initramfs")
    entry = esp_file("/loader/entries/hotsite.conf")
    assert f"root=PARTUUID={rootp['uuid'].lower()} ro" in entry and "console=ttyS0" in entry, entry
    assert "HOSTNAME=" in esp_file("/hotsite-firstboot.conf.example")
    fstab = subprocess.run(
        ["debugfs", "-R", "cat /etc/fstab", f"{disk}?offset={rootp['start'] * 512}"],
        capture_output=True,
        text=True,
    ).stdout
    assert f"PARTUUID={rootp['uuid'].lower()} / ext4" in fstab, fstab
    assert f"PARTUUID={esp['uuid'].lower()} /boot/efi vfat" in fstab, fstab


IMAGE_PACKAGES = {
    "debootstrap": "debootstrap",
    "sfdisk": "fdisk",
    "mcopy": "mtools",
    "mkfs.vfat": "dosfstools",
    "qemu-system-x86_64": "qemu-system-x86",
    "/usr/share/OVMF/OVMF_CODE_4M.fd": "ovmf",
}
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
BOOT_TIMEOUT_S = 300
# The appliance's config in the image: nothing in it needs an address the VM lacks.
IMAGE_CONFIG = {
    "appliance": {
        "name": "image",
        "socket_group": "hotsite-cli",
        "read_only_groups": ["hotsite-cli"],
        "operator_groups": ["hotsite-operators"],
    },
    "metrics": {"listen": "127.0.0.1:9477"},
    "sites": {
        "primary": {"role": "primary", "sbc": "203.0.113.10:5060", "kamailio_set": 1},
        "backup": {"role": "backup", "sbc": "198.51.100.10:5060", "kamailio_set": 2},
    },
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


def boot_milestones(console: str) -> dict[str, bool]:
    """What the serial console shows so far (ANSI colours stripped): the boot's known lines.

    systemd stops printing unit status on the console once the serial getty
    owns it, so whether hotsite started is asked over SSH, not read here.
    """
    plain = re.sub(r"\x1b\[[0-9;]*m", "", console)
    return {
        "kernel": "Linux version" in plain,
        "firstboot": "hotsite-firstboot: done for image-vm" in plain,
        "login": "image-vm login:" in plain,
    }


def _missing_tools() -> list[str]:
    return sorted(
        {pkg for tool, pkg in IMAGE_PACKAGES.items() if not (shutil.which(tool) or Path(tool).exists())}
    )


@pytest.fixture(scope="module")
def image_tools() -> None:
    """Debian's packages for the disk and the VM, installed here if missing (this slow path only)."""
    missing = _missing_tools()
    if missing:
        if shutil.which("apt-get") is None:
            pytest.skip(f"missing {missing} and no apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=300)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            check=True,
            env=env,
            timeout=900,
        )
    assert _missing_tools() == []


def _build(tmp_path: Path) -> tuple[Path, Path]:
    """The image of the Makefile's `image` target, built in tmp_path; the rootfs and the disk."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(REPO), "-w", str(wheels)], check=True)
    vars_file = tmp_path / "vars.yml"
    # The SMTP password is the site's, given at first boot: the image holds a placeholder
    # so that `hotsite config check` passes at build time.
    image_vars = {"hotsite_config": IMAGE_CONFIG, "hotsite_secrets": {"smtp-password": "set-at-first-boot\n"}}
    vars_file.write_text(yaml.safe_dump(image_vars))
    started = time.monotonic()
    result = subprocess.run(
        [str(REPO / "images/build-rootfs.sh"), str(tmp_path / "out"), str(wheels), str(vars_file)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    print(
        f"rootfs build: {time.monotonic() - started:.0f}s;", *re.findall(r"debootstrap: \d+s", result.stdout)
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    root, disk = tmp_path / "out/rootfs", tmp_path / "hotsite.img"
    started = time.monotonic()
    result = subprocess.run(
        [str(REPO / "images/build-disk.sh"), str(root), str(disk)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"disk image: {time.monotonic() - started:.0f}s, {disk.stat().st_size / 2**20:.0f} MiB")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, disk


def _check_rootfs(root: Path) -> None:
    assert (root / "opt/hotsite/bin/hotsite").exists()
    assert (root / "etc/systemd/system/multi-user.target.wants/hotsite.service").is_symlink()
    assert (root / "etc/systemd/system/multi-user.target.wants/hotsite-firstboot.service").is_symlink()
    assert (root / "etc/machine-id").read_text() == ""
    assert not list((root / "etc/ssh").glob("ssh_host_*")), "SSH host keys must be made per server"
    verify = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/hotsite.service"],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr


def _root_partition_mib(disk: Path) -> int:
    table = json.loads(subprocess.run(["sfdisk", "-J", str(disk)], capture_output=True, text=True).stdout)
    return int(table["partitiontable"]["partitions"][1]["size"]) * 512 // 2**20


def _prepare_like_a_technician(disk: Path, tmp_path: Path) -> Path:
    """A disk 1 GiB bigger than the image; the first-boot file and a secret on its EFI partition."""
    with disk.open("r+b") as f:
        f.truncate(disk.stat().st_size + 2**30)
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    conf = tmp_path / "hotsite-firstboot.conf"
    conf.write_text(
        "HOSTNAME=image-vm\nIFACE=eth0\nADDRESS=dhcp\nSECRETS_DIR=secrets\n"
        f'SSH_AUTHORIZED_KEY="{(tmp_path / "id_ed25519.pub").read_text().strip()}"\n'
    )
    (tmp_path / "smtp-password").write_text("s3cret-smtp\n")
    esp = f"{disk}@@1M"  # the ESP starts at 1 MiB (build-disk.sh)
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    subprocess.run(["mcopy", "-i", esp, str(conf), "::/hotsite-firstboot.conf"], check=True, env=env)
    subprocess.run(["mmd", "-i", esp, "::/secrets"], check=True, env=env)
    subprocess.run(["mcopy", "-i", esp, str(tmp_path / "smtp-password"), "::/secrets/"], check=True, env=env)
    return key


def _wait_for_login(console: Path, proc: subprocess.Popen[bytes], deadline: float) -> dict[str, bool]:
    seen = boot_milestones("")
    while time.monotonic() < deadline and proc.poll() is None:
        seen = boot_milestones(console.read_text(errors="replace") if console.exists() else "")
        if seen["firstboot"] and seen["login"]:
            break
        time.sleep(1)
    return seen


def _wait_for_hotsite(ssh: list[str], deadline: float) -> str:
    """systemd's word on hotsite.service once it has left "activating" (Type=notify: READY=1 sent)."""
    state = "unknown"
    while time.monotonic() < deadline:
        result = subprocess.run(
            [*ssh, "systemctl is-active hotsite"], capture_output=True, text=True, timeout=60
        )
        state = result.stdout.strip() or result.stderr.strip()
        if state in ("active", "failed"):
            break
        time.sleep(2)
    return state


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("HOTSITE_SLOW_TESTS") != "1", reason="set HOTSITE_SLOW_TESTS=1 (minutes, network)"
)
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("debootstrap") is None, reason="needs root and debootstrap"
)
@pytest.mark.timeout(2400)
def test_the_image_builds_and_boots_to_a_running_appliance(image_tools: None, tmp_path: Path) -> None:
    root, disk = _build(tmp_path)
    _check_rootfs(root)
    image_root_mib = _root_partition_mib(disk)
    key = _prepare_like_a_technician(disk, tmp_path)
    vars_fd = tmp_path / "OVMF_VARS.fd"
    shutil.copy(OVMF_VARS, vars_fd)
    console, port = tmp_path / "console.log", free_port()
    qemu = [
        "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-m", "1024", "-smp", "2",
        "-display", "none", "-monitor", "none", "-serial", f"file:{console}", "-no-reboot",
        "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,file={vars_fd}",
        "-drive", f"file={disk},format=raw,if=virtio",
        "-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:22",
    ]  # fmt: skip
    started = time.monotonic()
    qemu_log = (tmp_path / "qemu.log").open("wb")
    proc = subprocess.Popen(qemu, stdout=qemu_log, stderr=subprocess.STDOUT)
    ssh = [
        "ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=20", "root@127.0.0.1",
    ]  # fmt: skip
    try:
        seen = _wait_for_login(console, proc, started + BOOT_TIMEOUT_S)
        login_s = time.monotonic() - started
        tail = console.read_text(errors="replace")[-4000:] if console.exists() else "(no console output)"
        assert seen["firstboot"] and seen["login"], (seen, tail)
        state = _wait_for_hotsite(ssh, started + BOOT_TIMEOUT_S)
        print(
            f"boot (TCG): login prompt after first boot {login_s:.0f}s, hotsite {state} {time.monotonic() - started:.0f}s"
        )
        journal = subprocess.run(
            [*ssh, "journalctl -b -u hotsite --no-pager | tail -20"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert state == "active", journal.stdout
        probe = (
            "echo hostname=$(hostname); echo hotsite=$(systemctl is-active hotsite); "
            "echo secret=$(cat /etc/hotsite/secrets/smtp-password); "
            "echo secret_mode=$(stat -c %U:%G:%a /etc/hotsite/secrets/smtp-password); "
            "echo esp_secrets=$(ls /boot/efi/secrets 2>/dev/null | wc -l); "
            "echo root_mib=$(df --output=size -B1M / | tail -n 1 | tr -d ' '); "
            "echo system=$(systemctl is-system-running --wait)"
        )
        result = subprocess.run([*ssh, probe], capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr
        got = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        assert {k: got.get(k) for k in ("hostname", "hotsite", "secret", "secret_mode", "esp_secrets")} == {
            "hostname": "image-vm",
            "hotsite": "active",
            "secret": "s3cret-smtp",
            "secret_mode": "hotsite:hotsite:600",
            "esp_secrets": "0",  # moved off the FAT partition
        }, result.stdout
        assert int(got["root_mib"]) > image_root_mib + 900, f"root not grown from {image_root_mib} MiB: {got}"
        # No unit failed, so the appliance shows no red line to the technician.
        failed = subprocess.run(
            [*ssh, "systemctl --failed --no-legend"], capture_output=True, text=True, timeout=60
        )
        assert got["system"] == "running", (got, failed.stdout)
        subprocess.run([*ssh, "systemctl poweroff"], capture_output=True, timeout=60)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        qemu_log.close()
