"""hotsite under its real unit, as the hotsite user, inside the booted appliance image.

This machine's PID 1 is not systemd, so the unit's sandbox can only be proven
where systemd runs it: the image `make image` builds, booted under QEMU (KVM
where /dev/kvm works, TCG otherwise), console on ttyS0. The technician's steps
over SSH: the full configuration (a netlink actuator moving a service address
on the second NIC with gratuitous ARP, the Kamailio actuator's dispatcher list
in /etc/kamailio, the GSM modem on the second serial port), then

1. the unit as shipped before issue 18: `hotsite config check --unit` names
   RestrictAddressFamilies/AF_PACKET and ReadWritePaths, and a forced failover
   fails at the netlink step (the packet socket); with AF_PACKET added by a
   drop-in it fails at the Kamailio step (the dispatcher list is read-only);
2. the unit `hotsite unit render` writes: the check passes, the failover
   completes (address on eth1; the gratuitous ARP seen in a capture of the
   second NIC's wire, QEMU's filter-dump; the list rewritten), a test page
   reaches the modem emulator (a host pty behind the VM's USB serial port, ttyUSB0), `hotsite
   status` works for a member of the CLI group, SIGHUP reloads in place, and
   the watchdog restarts a stopped daemon (`kill -STOP`);
3. no EPERM/EACCES in the daemon's journal under the rendered unit.

Kamailio is real, on this machine's loopback (the lab's generated config),
reached from the VM through QEMU's user network (10.0.2.2). Each step's time
is printed (pytest -s). The debootstrap is kept between runs in
HOTSITE_IMAGE_CACHE (default /var/tmp/hotsite-image-cache): a rebuild only
re-applies the role. Minutes: only with HOTSITE_SLOW_TESTS=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from provisioning.lab import kamailio as lab_kamailio
from provisioning.lab import replication as lab_replication
from provisioning.lab import topology as topo
from provisioning.lab.lab import SCENARIO as LAB_UAS
from tests.conftest import REPO, free_port
from tests.integration import image_roles
from tests.integration.test_image_recipe import (
    IMAGE_CONFIG,
    OVMF_CODE,
    OVMF_VARS,
    _prepare_like_a_technician,
    _wait_for_hotsite,
    _wait_for_login,
    image_tools,  # noqa: F401 - the fixture that installs QEMU, OVMF and the disk tools
)
from tests.support.modem import ModemEmulator
from tests.unit.test_systemd_unit import OLD_UNIT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("HOTSITE_SLOW_TESTS") != "1", reason="set HOTSITE_SLOW_TESTS=1 (minutes, network)"
    ),
    pytest.mark.timeout(2400),
]


@pytest.fixture(autouse=True)
def asked_for_so_never_skipped() -> None:
    """Once HOTSITE_SLOW_TESTS=1 asks for this test (`make test`, hence CI), a missing
    prerequisite fails it: a skip would let CI pass without the image ever booting. QEMU, OVMF,
    debootstrap and the disk tools are installed by the image_tools fixture; Kamailio and SIPp
    by `make deps`."""
    missing = [
        what
        for what, ok in (
            ("root", os.geteuid() == 0),
            ("Kamailio (Debian kamailio; make deps)", lab_kamailio.find_binary() is not None),
            ("SIPp (Debian sip-tester; make deps)", shutil.which("sipp") is not None),
        )
        if not ok
    ]
    if missing:
        pytest.fail(f"HOTSITE_SLOW_TESTS=1 but this machine lacks: {', '.join(missing)}")


SERVICE_ADDRESS = "192.0.2.50"
# The sites' SBCs: the failover fences the primary's by its URI in Kamailio's list.
SBCS = ("203.0.113.10", "198.51.100.10")
ETH1_MAC = "52:54:00:12:34:99"
CACHE = Path(os.environ.get("HOTSITE_IMAGE_CACHE", "/var/tmp/hotsite-image-cache"))
REPLICA = "/var/lib/hotsite/replicas/crm.db"
BOOT_TIMEOUT_S = 300
# What the technician writes on the booted appliance (the image's own config has none of it).
FULL_CONFIG = f"""
[appliance]
name = "image"
socket_group = "hotsite-cli"
read_only_groups = ["hotsite-cli"]
operator_groups = ["hotsite-operators"]

[metrics]
listen = "127.0.0.1:9477"

[sites.primary]
role = "primary"
sbc = "{SBCS[0]}:5060"
kamailio_set = {topo.SET_PRIMARY}

[sites.backup]
role = "backup"
sbc = "{SBCS[1]}:5060"
kamailio_set = {topo.SET_BACKUP}

# The lab's trunk: SIPp answering OPTIONS on this machine, reached through QEMU's user network.
[trunks.lab]
address = "10.0.2.2:@SIP_PORT@"
interval_s = 2

[failover]
policy = "manual"
step_timeout_s = 10

# Runbook order: the service address first, then Kamailio.
[actuators.service-address]
type = "netlink"
address = "{SERVICE_ADDRESS}/24"
interface = "eth1"
garp_count = 3
garp_interval_s = 0.3

[actuators.kamailio]
type = "kamailio"

[kamailio]
rpc_url = "http://10.0.2.2:{topo.RPC_PORT}/RPC"
dispatcher_list = "/etc/kamailio/dispatcher.list"

[[contacts]]
name = "Zhang Wei"
phone = "+8613800138000"

[channels.sms]
type = "gsm"
device = "/dev/ttyUSB0"
poll_s = 5

[channels.email]
type = "smtp"
host = "smtp.example.com"
from_addr = "hotsite@example.com"
username = "hotsite"
password_file = "/etc/hotsite/secrets/smtp-password"

# The primary's CRM database from the lab's `hotsite source` on this machine (mutual TLS).
[replication]
source_agent = "10.0.2.2:@SOURCE_PORT@"
server_name = "{lab_replication.SOURCE_NAME}"
tls_cert_file = "/etc/hotsite/tls/appliance.crt"
tls_key_file = "/etc/hotsite/secrets/appliance.key"
tls_ca_file = "/etc/hotsite/tls/ca.crt"

[replication.streams.crm]
kind = "sqlite"
source = "{lab_replication.CRM_STREAM}"
replica = "{REPLICA}"
rpo_budget_s = 5
"""
DENIED = re.compile(r"EPERM|EACCES|Operation not permitted|Permission denied")


class Timeline:
    """Each step of the test with its time since the test started, printed as it happens and
    again at the end (pass or fail), so a CI log shows where the minutes went."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.log: list[str] = []

    def step(self, what: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f}s] {what}"
        self.log.append(line)
        print(line, flush=True)


class Vm:
    """The booted appliance: SSH as root, each step timed."""

    def __init__(self, ssh: list[str], clock: Timeline, out: Path, fwd: image_roles.Forwards) -> None:
        self.ssh = ssh
        self.fwd = fwd  # this machine's ports forwarded to the VM's SSH, source agent and witness
        self.out = out  # the last journal read is kept here (journal.txt): failures show it whole
        self.clock = clock

    def run(self, script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.ssh, script], capture_output=True, text=True, timeout=timeout)

    def must(self, script: str, timeout: float = 120) -> str:
        result = self.run(script, timeout)
        assert result.returncode == 0, (script, result.stdout[-2000:], result.stderr[-2000:])
        return result.stdout

    def step(self, what: str) -> None:
        self.clock.step(what)

    def restart_hotsite(self) -> str:
        """Restart under whatever unit is installed now; the journal cursor before it."""
        cursor = self.must("journalctl -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p'").strip()
        self.must("systemctl daemon-reload && systemctl restart hotsite")
        state = _wait_for_hotsite(self.ssh, time.monotonic() + 120)
        assert state == "active", self.run("journalctl -u hotsite -n 40 --no-pager").stdout
        self.must(
            "for i in $(seq 60); do /opt/hotsite/bin/hotsite status --json >/dev/null 2>&1 && exit 0; "
            "sleep 1; done; exit 1"
        )
        return cursor

    def journal_since(self, cursor: str) -> str:
        journal = self.run(f"journalctl -u hotsite --after-cursor='{cursor}' --no-pager -o cat").stdout
        (self.out / "journal.txt").write_text(journal)
        return journal

    def wait_journal(self, cursor: str, text: str, timeout: float = 60) -> str:
        """The daemon's journal since ``cursor`` once it holds ``text`` (the runbook runs after the
        command returns), or as it is at the deadline."""
        deadline = time.monotonic() + timeout
        journal = self.journal_since(cursor)
        while text not in journal and time.monotonic() < deadline:
            time.sleep(1)
            journal = self.journal_since(cursor)
        return journal

    def failover(self, reason: str) -> subprocess.CompletedProcess[str]:
        return self.run(
            f"/opt/hotsite/bin/hotsite failover --to backup --force --yes --json --reason '{reason}'", 120
        )


def _build_cached(tmp_path: Path, clock: Timeline) -> Path:
    """The image of `make image`, built in tmp_path from a bare debootstrap (the tarball kept in
    CACHE by build-rootfs.sh, or a fresh one): never over an earlier build's tree."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(REPO), "-w", str(wheels)], check=True)
    clock.step("build: pip wheel")
    vars_file = tmp_path / "vars.yml"
    image_vars = {"hotsite_config": IMAGE_CONFIG, "hotsite_secrets": {"smtp-password": "set-at-first-boot\n"}}
    vars_file.write_text(yaml.safe_dump(image_vars))
    result = subprocess.run(
        [str(REPO / "images/build-rootfs.sh"), str(tmp_path / "out"), str(wheels), str(vars_file)],
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "HOTSITE_IMAGE_CACHE": str(CACHE)},
    )
    (tmp_path / "build-rootfs.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    debootstrap = re.search(r"^debootstrap: .*$", result.stdout, re.M)
    clock.step(f"build: root filesystem ({debootstrap.group(0) if debootstrap else 'debootstrap: ?'})")
    disk = tmp_path / "hotsite.img"
    result = subprocess.run(
        [str(REPO / "images/build-disk.sh"), str(tmp_path / "out/rootfs"), str(disk)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shutil.rmtree(tmp_path / "out/rootfs")  # 900 MB, now in the disk
    clock.step("build: disk image")
    return disk


def _wheels(tmp_path: Path) -> Path:
    """The wheels the image was built from (pip wheel of this tree), for the roles applied later."""
    wheels = tmp_path / "wheels"
    if not any(wheels.glob("hotsite-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(REPO), "-w", str(wheels)], check=True)
    return wheels


def _given_disk(tmp_path: Path) -> Path | None:
    """A copy of HOTSITE_IMAGE_DISK (an image `make image` built with IMAGE_CONFIG) instead of a
    build: the boot changes the disk, so the given one is copied (sparse)."""
    given = os.environ.get("HOTSITE_IMAGE_DISK")
    if not given:
        return None
    disk = tmp_path / "hotsite.img"
    subprocess.run(["cp", "--sparse=always", given, str(disk)], check=True)
    return disk


@pytest.fixture
def sip_trunk(tmp_path: Path) -> Iterator[int]:
    """A carrier's trunk: SIPp with the lab's UAS scenario (answers OPTIONS 200) on this machine's loopback."""
    sipp = shutil.which("sipp")
    if sipp is None:
        pytest.skip("needs SIPp (Debian sip-tester)")
    port = free_port()
    log = (tmp_path / "sipp.log").open("wb")
    cmd = [sipp, "-sf", str(LAB_UAS), "-i", "127.0.0.1", "-p", str(port), "-bind_local", "-nostdin"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def kamailio(tmp_path: Path) -> Iterator[Path]:
    """The carrier edge's Kamailio (the lab's config) on this machine's loopback."""
    module_dir = lab_kamailio.find_module_dir()
    binary = lab_kamailio.find_binary()
    assert module_dir and binary
    run = tmp_path / "kamailio"
    run.mkdir()
    listed = run / "dispatcher.list"
    listed.write_text(lab_kamailio.render_dispatcher_list(*SBCS))
    cfg = run / "kamailio.cfg"
    cfg.write_text(
        lab_kamailio.render_cfg(
            address="127.0.0.1", module_dir=module_dir, dispatcher_list=listed, rpc_socket=run / "rpc.sock"
        )
    )
    log = (run / "kamailio.log").open("wb")
    proc = subprocess.Popen(
        lab_kamailio.command(binary, cfg, run / "kamailio.pid", run), stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ["ss", "-ltn", f"sport = :{topo.RPC_PORT}"], capture_output=True, text=True
            )
            if f":{topo.RPC_PORT}" in probe.stdout:
                break
            assert proc.poll() is None, (run / "kamailio.log").read_text()[-2000:]
            time.sleep(0.3)
        yield listed
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@dataclass
class LabSource:
    """The primary site's replication agent as the appliance sees it."""

    port: int  # on this machine's loopback: 10.0.2.2 from inside the VM
    tls: dict[str, Path]  # the appliance's client certificate, its key and the CA
    db: Path  # the primary's CRM database, which the lab's writer keeps committing to


@pytest.fixture
def lab_source(tmp_path: Path) -> Iterator[LabSource]:
    """The lab primary's `hotsite source` and CRM writer (provisioning/lab/replication.py) on this
    machine's loopback with the lab's throwaway CA: mutual TLS, the agent allowing only the
    appliance's client certificate."""
    work = tmp_path / "primary"
    work.mkdir()
    repl = lab_replication.prepare(work, "127.0.0.1")
    port = free_port()
    config = Path(repl["source_config"])
    config.write_text(config.read_text().replace(f"127.0.0.1:{lab_replication.PORT}", f"127.0.0.1:{port}"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, argv in lab_replication.commands(repl):
            with (work / f"{name}.log").open("wb") as log:
                procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while (
            f":{port}"
            not in subprocess.run(["ss", "-ltn", f"sport = :{port}"], capture_output=True, text=True).stdout
        ):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), (
                work / "source.log"
            ).read_text()[-2000:]
            time.sleep(0.3)
        tls = {key: Path(repl[key]) for key in ("tls_cert_file", "tls_key_file", "tls_ca_file")}
        yield LabSource(port, tls, Path(repl["streams"][lab_replication.CRM_STREAM]["path"]))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def _arp_announcements(pcap: Path, address: str) -> int:
    """Gratuitous ARP frames for ``address`` in a pcap file (QEMU's filter-dump writes one)."""
    data = pcap.read_bytes() if pcap.exists() else b""
    target = bytes(int(x) for x in address.split("."))
    count, offset = 0, 24
    while offset + 16 <= len(data):
        incl = struct.unpack_from("<I", data, offset + 8)[0]
        frame = data[offset + 16 : offset + 16 + incl]
        offset += 16 + incl
        if len(frame) >= 42 and frame[12:14] == b"\x08\x06" and frame[28:32] == target == frame[38:42]:
            count += 1
    return count


KVM_PROOF_S = 60  # under KVM the kernel prints its banner within seconds of power-on


def _qemu(
    tmp_path: Path, disk: Path, modem: ModemEmulator, accel: str, fwd: image_roles.Forwards
) -> subprocess.Popen[bytes]:
    """Power the VM on with fresh firmware variables and an empty console log."""
    shutil.copy(OVMF_VARS, tmp_path / "OVMF_VARS.fd")
    (tmp_path / "console.log").unlink(missing_ok=True)
    cpu = ["-cpu", "host"] if accel == "kvm" else []
    qemu = [
        "qemu-system-x86_64", "-accel", accel, *cpu, "-machine", "q35", "-m", "1024", "-smp", "2",
        "-display", "none", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{tmp_path / 'console.log'}",
        # The modem on USB, as on the appliance (an FTDI serial port: /dev/ttyUSB0). Not on a
        # second COM port: OVMF reads every COM port as a console, and the emulator's echo of the
        # firmware's output there is a keypress that stops the boot in the firmware's menu.
        "-device", "qemu-xhci,id=usb", "-chardev", f"serial,id=modem,path={modem.path}",
        "-device", "usb-serial,bus=usb.0,chardev=modem",
        "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,file={tmp_path / 'OVMF_VARS.fd'}",
        "-drive", f"file={disk},format=raw,if=virtio",
        "-nic", f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{fwd.ssh}-:22"
        f",hostfwd=tcp:127.0.0.1:{fwd.source}-:{image_roles.SOURCE_PORT}"
        f",hostfwd=tcp:127.0.0.1:{fwd.witness}-:{image_roles.WITNESS_PORT}",
        "-netdev", "user,id=lan,restrict=on", "-device", f"virtio-net-pci,netdev=lan,mac={ETH1_MAC}",
        "-object", f"filter-dump,id=capture,netdev=lan,file={tmp_path / 'eth1.pcap'}",
    ]  # fmt: skip
    return subprocess.Popen(
        qemu, stdout=(tmp_path / f"qemu-{accel}.log").open("wb"), stderr=subprocess.STDOUT
    )


def _kernel_started(tmp_path: Path, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline and proc.poll() is None:
        console = tmp_path / "console.log"
        if console.exists() and "Linux version" in console.read_text(errors="replace"):
            return True
        time.sleep(1)
    return False


def _power_on(
    tmp_path: Path, disk: Path, modem: ModemEmulator, fwd: image_roles.Forwards
) -> tuple[subprocess.Popen[bytes], str]:
    """KVM where /dev/kvm is there and actually runs the guest, TCG otherwise.

    A nested or half-emulated KVM (this build machine's) opens /dev/kvm and then fails on the
    first MSR or instruction it cannot virtualise, leaving QEMU dead or paused: if the kernel's
    banner is not on the console within KVM_PROOF_S, the VM is powered off and booted by TCG.
    Nothing has been written to the disk by then (the firmware never got to the boot loader)."""
    if os.access("/dev/kvm", os.W_OK):
        proc = _qemu(tmp_path, disk, modem, "kvm", fwd)
        if _kernel_started(tmp_path, proc, time.monotonic() + KVM_PROOF_S):
            return proc, "kvm"
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        print(f"KVM does not run the guest here: {(tmp_path / 'qemu-kvm.log').read_text()[:200]!r}; TCG")
    return _qemu(tmp_path, disk, modem, "tcg", fwd), "tcg"


def _boot(
    tmp_path: Path, disk: Path, modem: ModemEmulator, clock: Timeline
) -> tuple[subprocess.Popen[bytes], Vm]:
    key = _prepare_like_a_technician(disk, tmp_path)
    fwd = image_roles.Forwards(ssh=free_port(), source=free_port(), witness=free_port(), key=key)
    clock.step("power on")
    proc, accel = _power_on(tmp_path, disk, modem, fwd)
    ssh = [
        "ssh", "-i", str(key), "-p", str(fwd.ssh), "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
        "-o", "ConnectTimeout=20", "root@127.0.0.1",
    ]  # fmt: skip
    vm = Vm(ssh, clock, tmp_path, fwd)
    seen = _wait_for_login(tmp_path / "console.log", proc, time.monotonic() + BOOT_TIMEOUT_S)
    assert seen["firstboot"] and seen["login"], (seen, (tmp_path / "console.log").read_text()[-3000:])
    vm.step(f"booted ({accel}): login prompt")
    assert _wait_for_hotsite(ssh, time.monotonic() + BOOT_TIMEOUT_S) == "active"
    vm.step("hotsite.service active under the image's unit")
    return proc, vm


def _install_config(vm: Vm, sip_port: int, source: LabSource) -> None:
    """The technician's configuration, the Kamailio list directory the daemon writes, eth1 up,
    the replication certificates (the key as a secret: the service user's, 0600)."""
    config = FULL_CONFIG.replace("@SIP_PORT@", str(sip_port)).replace("@SOURCE_PORT@", str(source.port))
    listed = lab_kamailio.render_dispatcher_list(*SBCS)
    tls = {name: source.tls[key].read_text() for name, key in (
        ("/etc/hotsite/tls/appliance.crt", "tls_cert_file"),
        ("/etc/hotsite/tls/ca.crt", "tls_ca_file"),
        ("/etc/hotsite/secrets/appliance.key", "tls_key_file"),
    )}  # fmt: skip
    vm.must(
        "set -e; install -d -m 0755 /etc/hotsite/tls\n"
        + "".join(f"cat > {path} <<'EOF'\n{pem.strip()}\nEOF\n" for path, pem in tls.items())
        + "chmod 0644 /etc/hotsite/tls/*.crt\n"
        "chown hotsite:hotsite /etc/hotsite/secrets/appliance.key && chmod 0600 /etc/hotsite/secrets/appliance.key"
    )
    vm.must(
        textwrap.dedent(f"""\
        set -e
        cat > /etc/hotsite/hotsite.toml <<'EOF'
        {textwrap.indent(config, "        ").strip()}
        EOF
        install -d -o hotsite -g hotsite -m 0755 /etc/kamailio
        cat > /etc/kamailio/dispatcher.list <<'EOF'
        {textwrap.indent(listed, "        ").strip()}
        EOF
        chown hotsite:hotsite /etc/kamailio/dispatcher.list
        ip link set eth1 up
        /opt/hotsite/bin/hotsite config check /etc/hotsite/hotsite.toml
        """)
    )


def test_the_daemon_runs_every_feature_under_its_real_unit(
    image_tools: None,  # noqa: F811 - the imported fixture
    kamailio: Path,
    sip_trunk: int,
    lab_source: LabSource,
    tmp_path: Path,
) -> None:
    clock = Timeline()
    disk = _given_disk(tmp_path) or _build_cached(tmp_path, clock)
    clock.step("image ready")
    modem = ModemEmulator().start()
    proc: subprocess.Popen[bytes] | None = None
    try:
        proc, vm = _boot(tmp_path, disk, modem, clock)
        _config_dir_agrees_with_the_unit(vm)
        _install_config(vm, sip_trunk, lab_source)
        vm.step(
            "full configuration installed (lab trunk, netlink on eth1, Kamailio list, modem on ttyUSB0,"
            " replication from the lab's source agent)"
        )
        _old_unit_refuses(vm)
        _rendered_unit_runs_everything(vm, tmp_path, modem, lab_source)
        if os.environ.get("HOTSITE_IMAGE_ROLES") == "1":
            image_roles.apply_and_prove(vm, vm.fwd, _wheels(tmp_path), tmp_path / "roles")
        else:
            vm.step(
                "source and witness roles under systemd: not run (HOTSITE_IMAGE_ROLES=1; ~15 min under TCG)"
            )
        vm.run("systemctl poweroff", 30)
        proc.wait(120)
        clock.step("powered off")
    finally:
        print("\n".join(["steps:", *clock.log]), flush=True)
        modem.stop()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _config_dir_agrees_with_the_unit(vm: Vm) -> None:
    """/etc/hotsite as the role made it (root:root 0755: the config holds no secret, CLI users
    read it) is what the unit's ConfigurationDirectoryMode= says, so systemd warns of nothing."""
    modes = vm.must("stat -c '%n %a %U:%G' /etc/hotsite /etc/hotsite/hotsite.toml /etc/hotsite/secrets")
    assert modes.splitlines() == [
        "/etc/hotsite 755 root:root",
        "/etc/hotsite/hotsite.toml 644 root:root",
        "/etc/hotsite/secrets 700 hotsite:hotsite",
    ], modes
    unit_mode = vm.must("systemctl show -p ConfigurationDirectoryMode --value hotsite").strip()
    assert unit_mode == "0755", unit_mode
    warned = vm.run("journalctl -b --no-pager -o cat | grep 'already exists but the mode is different'")
    assert warned.stdout == "", warned.stdout
    vm.step("/etc/hotsite 0755 root:root as the unit says; no mode warning in this boot's journal")


EXPOSURE_TARGETS = {"hotsite.service": 3.0, "hotsite-firstboot.service": 5.0}  # issue 18


def _exposure(vm: Vm, unit: str) -> float:
    """systemd's overall exposure score for ``unit`` as loaded by the appliance's own systemd."""
    out = vm.must(f"systemd-analyze security --no-pager {unit}")
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
    assert found, out[-1000:]
    return float(found.group(1))


def _trunk_up(vm: Vm, timeout: float = 60) -> dict[str, object]:
    """The lab trunk as `hotsite status` shows it once its OPTIONS probe has been answered."""
    deadline = time.monotonic() + timeout
    trunk: dict[str, object] = {}
    while time.monotonic() < deadline:
        status = json.loads(vm.must("/opt/hotsite/bin/hotsite status --json"))
        trunk = next(t for t in status["trunks"] if t["name"] == "lab")
        if trunk["state"] == "up":
            return trunk
        time.sleep(2)
    raise AssertionError(f"the lab trunk never came up: {trunk}")


def _primary_rows(db: Path) -> tuple[int, int] | None:
    """(customers, newest ticket id) in a database another process writes; None mid-write.
    ``immutable=1``: no -shm/-wal made beside it and no lock taken."""
    try:
        with sqlite3.connect(f"file:{db}?immutable=1", uri=True) as conn:
            customers = conn.execute("SELECT count(*) FROM customers").fetchone()[0]
            newest = conn.execute("SELECT max(id) FROM tickets").fetchone()[0]
            return int(customers), int(newest)
    except sqlite3.DatabaseError:
        return None


REPLICA_ROWS = (
    "import sqlite3; c = sqlite3.connect('file:" + REPLICA + "?immutable=1', uri=True); "
    "print(c.execute('SELECT count(*) FROM customers').fetchone()[0], "
    "c.execute('SELECT max(id) FROM tickets').fetchone()[0])"
)


def _replicated(vm: Vm, source: LabSource, timeout: float = 180) -> tuple[dict[str, object], tuple[int, int]]:
    """The crm stream once `replication status` shows it up and the replica in the VM (read as
    the hotsite user) holds every customer and a ticket the writer committed after this call."""
    deadline = time.monotonic() + timeout
    at_primary = None
    while at_primary is None and time.monotonic() < deadline:
        at_primary = _primary_rows(source.db)
    assert at_primary is not None
    stream: dict[str, object] = {}
    rows: tuple[int, int] = (0, 0)
    while time.monotonic() < deadline:
        status = json.loads(vm.must("/opt/hotsite/bin/hotsite replication status --json"))
        stream = next(s for s in status["streams"] if s["name"] == "crm")
        read = vm.run(f'runuser -u hotsite -- /opt/hotsite/bin/python -c "{REPLICA_ROWS}"')
        if read.returncode == 0 and read.stdout.split()[1:] != ["None"]:
            rows = (int(read.stdout.split()[0]), int(read.stdout.split()[1]))
        if stream["connected"] and rows[0] == at_primary[0] and rows[1] >= at_primary[1]:
            return stream, rows
        time.sleep(2)
    raise AssertionError(f"the replica never caught up with {at_primary}: {rows}, {stream}")


def _old_unit_refuses(vm: Vm) -> None:
    old = OLD_UNIT.replace("Type=notify", "Type=notify\nNotifyAccess=main\nWatchdogSec=30")
    vm.must(f"cat > /etc/systemd/system/hotsite.service <<'EOF'\n{old}EOF")
    check = vm.run(
        "/opt/hotsite/bin/hotsite config check /etc/hotsite/hotsite.toml --unit /etc/systemd/system/hotsite.service"
    )
    assert check.returncode == 2, check.stdout + check.stderr
    assert "add AF_PACKET" in check.stderr and "add ReadWritePaths=/etc/kamailio" in check.stderr, (
        check.stderr
    )
    vm.step(
        "old unit: config check --unit exit 2, names RestrictAddressFamilies/AF_PACKET and ReadWritePaths"
    )
    cursor = vm.restart_hotsite()
    failed = vm.failover("old unit, issue 18")
    journal = vm.wait_journal(cursor, "Address family not supported")
    assert "Address family not supported" in journal, (failed, journal[-3000:])
    vm.step(f"old unit: failover refused at the netlink step (AF_PACKET): exit {failed.returncode}")
    vm.must(
        "mkdir -p /etc/systemd/system/hotsite.service.d && printf '[Service]\\nRestrictAddressFamilies=AF_PACKET\\n'"
        " > /etc/systemd/system/hotsite.service.d/50-packet.conf"
    )
    cursor = vm.restart_hotsite()
    failed = vm.failover("old unit with AF_PACKET, issue 18")
    journal = vm.wait_journal(cursor, "Read-only file system")
    assert "Read-only file system" in journal, (failed, journal[-3000:])
    vm.step(
        f"old unit + AF_PACKET: failover refused at the Kamailio step (list read-only): exit {failed.returncode}"
    )
    vm.must("rm -r /etc/systemd/system/hotsite.service.d")


def _rendered_unit_runs_everything(vm: Vm, tmp_path: Path, modem: ModemEmulator, source: LabSource) -> None:
    vm.must(
        "/opt/hotsite/bin/hotsite -c /etc/hotsite/hotsite.toml unit render -o /etc/systemd/system/hotsite.service"
        " && /opt/hotsite/bin/hotsite config check /etc/hotsite/hotsite.toml --unit /etc/systemd/system/hotsite.service"
        " && systemd-analyze verify /etc/systemd/system/hotsite.service"
    )
    vm.step("rendered unit: config check --unit ok, systemd-analyze verify ok")
    cursor = vm.restart_hotsite()
    scores = {unit: _exposure(vm, unit) for unit in EXPOSURE_TARGETS}
    vm.step(
        "systemd-analyze security on the appliance: "
        + ", ".join(f"{unit} {score} (target {EXPOSURE_TARGETS[unit]})" for unit, score in scores.items())
    )
    assert all(scores[unit] <= EXPOSURE_TARGETS[unit] for unit in scores), scores
    trunk = _trunk_up(vm)
    vm.step(
        f"SIP probe: trunk lab {trunk['address']} up, OPTIONS {trunk['last_code']} in {trunk['rtt_ms']} ms"
    )
    stream, rows = _replicated(vm, source)
    vm.step(
        f"replication: stream crm {stream['mode']} from 10.0.2.2:{source.port} (mutual TLS),"
        f" {rows[0]} customers and tickets up to #{rows[1]} in {REPLICA}, lag {stream['lag_s']} s"
    )
    pcap = tmp_path / "eth1.pcap"
    earlier = _arp_announcements(pcap, SERVICE_ADDRESS)  # the old unit + AF_PACKET's failover sent some
    done = vm.failover("rendered unit, issue 18")
    assert done.returncode == 0, (done.stdout, done.stderr, vm.journal_since(cursor)[-3000:])
    vm.must(
        f"for i in $(seq 60); do ip -4 addr show eth1 | grep -q {SERVICE_ADDRESS} && exit 0; sleep 0.5; done; exit 1"
    )
    listed = vm.must(
        f"for i in $(seq 60); do grep -q '^{topo.SET_PRIMARY} .* 4 ' /etc/kamailio/dispatcher.list && break;"
        " sleep 0.5; done; cat /etc/kamailio/dispatcher.list"
    )
    assert re.search(rf"^{topo.SET_PRIMARY} sip:\S+ 4\b", listed, re.M), listed  # the primary set disabled
    deadline = time.monotonic() + 30
    while _arp_announcements(pcap, SERVICE_ADDRESS) - earlier < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    garps = _arp_announcements(pcap, SERVICE_ADDRESS) - earlier
    assert garps >= 3, (garps, earlier)  # garp_count = 3, all from this failover
    vm.step(
        f"failover: {SERVICE_ADDRESS} on eth1, {garps} gratuitous ARP captured, dispatcher list rewritten"
    )

    page = vm.run("/opt/hotsite/bin/hotsite page test 'Zhang Wei' --channel sms --json", 180)
    assert page.returncode == 0, (page.stdout, page.stderr, vm.journal_since(cursor)[-3000:])
    texts = modem.submitted_texts()
    assert texts and texts[0][0].endswith("8613800138000"), texts
    vm.step(f"page: {len(texts)} SMS part(s) submitted to the modem on ttyUSB0")

    status = vm.must(
        "id tech >/dev/null 2>&1 || useradd -m -G hotsite-cli tech; "
        "runuser -u tech -- /opt/hotsite/bin/hotsite status --json"
    )
    assert json.loads(status)["failover"], status
    vm.step("hotsite status as tech (group hotsite-cli, read-only): ok")

    pid = vm.must("systemctl show -p MainPID --value hotsite").strip()
    vm.must("systemctl reload hotsite && sleep 3")
    assert vm.must("systemctl show -p MainPID --value hotsite").strip() == pid
    assert vm.must("systemctl is-active hotsite").strip() == "active"
    vm.step(f"SIGHUP: reloaded in place (pid {pid})")

    restarts = int(vm.must("systemctl show -p NRestarts --value hotsite"))
    vm.must(f"kill -STOP {pid}")
    stopped = time.monotonic()
    deadline = stopped + 90
    new_pid = pid
    while time.monotonic() < deadline and new_pid in (pid, "0", ""):
        time.sleep(2)
        new_pid = vm.must("systemctl show -p MainPID --value hotsite").strip()
    assert new_pid not in (pid, "0", ""), vm.run("journalctl -u hotsite -n 30 --no-pager").stdout
    assert int(vm.must("systemctl show -p NRestarts --value hotsite")) == restarts + 1
    vm.step(f"watchdog: stopped pid {pid} replaced by {new_pid} after {time.monotonic() - stopped:.0f}s")
    assert _wait_for_hotsite(vm.ssh, time.monotonic() + 120) == "active"

    journal = vm.journal_since(cursor)
    denied = [line for line in journal.splitlines() if DENIED.search(line)]
    assert denied == [], denied
    vm.step("journal under the rendered unit: no EPERM/EACCES")
