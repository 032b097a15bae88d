"""A throw-away SSH host for provisioning tests: sshd in its own network namespace.

The host is this machine's root filesystem seen through a copy-on-write
overlay (writes land in a tmpfs and vanish with the host), so Ansible can
create users, install a virtualenv under /opt and write /etc/systemd without
touching the machine the tests run on. The overlay, its tmpfs and the bind
mounts live in a private mount namespace owned by the sshd process: when it
dies they are gone. What is left to clean (the network namespace, its veth
pair, the temp dir with keys) is removed by :meth:`SshHost.down`, which is
safe to call twice and after a half-finished :meth:`up`.

Needs root, ``/usr/sbin/sshd`` (Debian ``openssh-server``), ``ip`` and
``unshare`` (util-linux).
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")


def available() -> str | None:
    """None when an SshHost can be made here, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, mounts)"
    for tool in ("ip", "unshare", "ssh-keygen", "chroot"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not SSHD.exists():
        return "sshd is not installed (Debian openssh-server)"
    return None


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def _free_subnet() -> int:
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    candidates = [n for n in range(1, 255) if f"10.99.{n}." not in used]
    if not candidates:
        raise RuntimeError("no free 10.99.<n>.0/30 subnet")
    return random.choice(candidates)


class SshHost:
    """sshd on ``10.99.<n>.2:22`` in namespace ``hs-prov-<random>``; root logs in with :attr:`key`."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.netns = f"hs-prov-{tag}"
        self.veth_host = f"hsp{tag}h"
        self.veth_ns = f"hsp{tag}n"
        self.subnet = _free_subnet()
        self.address = f"10.99.{self.subnet}.2"
        self.gateway = f"10.99.{self.subnet}.1"
        self.dir = Path(tempfile.mkdtemp(prefix="hs-prov-"))
        self.key = self.dir / "id_ed25519"
        self.root = self.dir / "root"  # the overlay's mount point (inside sshd's mount namespace)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "sshd.log"

    # -- lifecycle -----------------------------------------------------------

    def up(self, timeout: float = 10.0) -> SshHost:
        try:
            self._keys()
            self._network()
            self._sshd()
            self._wait(timeout)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # Processes left in the namespace (a daemon a test started over ssh) go with it.
        pids = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout
        for pid in pids.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "link", "del", self.veth_host], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SshHost:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- what tests use ----------------------------------------------------------

    def ssh_args(self) -> list[str]:
        return [
            "ssh",
            "-i",
            str(self.key),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "BatchMode=yes",
            f"root@{self.address}",
        ]

    def ssh(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on the host as root; never raises on a non-zero exit."""
        return subprocess.run([*self.ssh_args(), command], capture_output=True, text=True, timeout=timeout)

    def path(self, inside: str) -> Path:
        """A path of the host's filesystem as seen from here (through sshd's mount namespace)."""
        assert self.proc is not None
        return Path(f"/proc/{self.proc.pid}/root") / inside.lstrip("/")

    def inventory(self, name: str = "appliance") -> str:
        """An INI inventory line for Ansible."""
        return (
            f"{name} ansible_host={self.address} ansible_user=root "
            f"ansible_ssh_private_key_file={self.key} ansible_python_interpreter=/usr/bin/python3 "
            "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'"
        )

    # -- steps ------------------------------------------------------------------

    def _keys(self) -> None:
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / "host_key"))
        shutil.copy(self.dir / "id_ed25519.pub", self.dir / "authorized_keys")
        (self.dir / "sshd_config").write_text(
            f"ListenAddress {self.address}\n"
            "Port 22\n"
            f"HostKey {self.dir / 'host_key'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PidFile none\n"
            "MaxStartups 50\n"
            "MaxSessions 50\n"
            "Subsystem sftp /usr/lib/openssh/sftp-server\n"
        )

    def _network(self) -> None:
        _run("ip", "netns", "add", self.netns)
        _run("ip", "link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
        _run("ip", "link", "set", self.veth_ns, "netns", self.netns)
        _run("ip", "addr", "add", f"{self.gateway}/30", "dev", self.veth_host)
        _run("ip", "link", "set", self.veth_host, "up")
        ns = ("ip", "netns", "exec", self.netns)
        _run(*ns, "ip", "addr", "add", f"{self.address}/30", "dev", self.veth_ns)
        _run(*ns, "ip", "link", "set", self.veth_ns, "up")
        _run(*ns, "ip", "link", "set", "lo", "up")
        _run(*ns, "ip", "route", "add", "default", "via", self.gateway)

    def _sshd(self) -> None:
        cow, root = self.dir / "cow", self.root
        cow.mkdir()
        root.mkdir()
        # Inside a private mount namespace: a tmpfs for the overlay's upper layer
        # (it may not live on the lower filesystem), the overlay over /, the
        # kernel filesystems, a fresh /run, then sshd chrooted into it.
        script = f"""set -e
mount -t tmpfs -o size=2g,mode=0755 hs-prov {cow}
mkdir {cow}/upper {cow}/work
mount -t overlay hs-prov -o lowerdir=/,upperdir={cow}/upper,workdir={cow}/work {root}
mount --rbind /proc {root}/proc
mount --rbind /sys {root}/sys
mount --rbind /dev {root}/dev
mount -t tmpfs -o mode=0755 hs-prov-run {root}/run
mkdir -p {root}/run/sshd
exec chroot {root} {SSHD} -D -e -f {self.dir / "sshd_config"}
"""
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.netns,
                    "unshare",
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    script,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection((self.address, 22), timeout=0.5) as sock:
                    if sock.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"sshd did not answer on {self.address}:22 within {timeout}s")
