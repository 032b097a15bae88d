"""Kamailio processes for the benchmarks: a stateless OPTIONS responder and a dispatcher pinger.

The responder answers OPTIONS with ``sl_send_reply("200", "OK")``: no transaction,
no dialog, so it costs a few microseconds per request and is not what limits a
probe benchmark (SIPp would be: it makes a call per OPTIONS). Its CPU is read
with psutil and printed so a reader can see which side was the bottleneck.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from provisioning.lab.kamailio import find_binary, find_module_dir

RESPONDER_CFG = """#!KAMAILIO
debug=0
log_stderror=yes
memdbg=5
memlog=5
children={children}
tcp_children={children}
auto_aliases=no
dns=no
rev_dns=no
{listens}
mpath="{module_dir}"
loadmodule "pv.so"
loadmodule "sl.so"
loadmodule "cfgutils.so"
request_route {{
    if ($rm == "OPTIONS") {{
        {delay}
        sl_send_reply("200", "OK");
        exit;
    }}
    sl_send_reply("405", "Method Not Allowed");
}}
"""

PINGER_CFG = """#!KAMAILIO
debug=0
log_stderror=yes
memdbg=5
memlog=5
children=1
auto_aliases=no
dns=no
rev_dns=no
listen=udp:{address}:5060
mpath="{module_dir}"
loadmodule "pv.so"
loadmodule "sl.so"
loadmodule "tm.so"
loadmodule "kex.so"
loadmodule "ctl.so"
loadmodule "dispatcher.so"
modparam("ctl", "binrpc", "unix:{ctl_socket}")
modparam("tm", "fr_timer", 1000)
modparam("dispatcher", "list_file", "{list_file}")
modparam("dispatcher", "ds_ping_interval", 1)
modparam("dispatcher", "ds_probing_mode", 1)
modparam("dispatcher", "ds_ping_from", "sip:pinger@{address}")
request_route {{
    sl_send_reply("404", "Not here");
}}
"""


@dataclass
class KamailioProcess:
    """One Kamailio in the foreground (-DD) and its process tree, for CPU accounting."""

    proc: subprocess.Popen[bytes]
    workdir: Path

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_seconds(self) -> float:
        """User + system CPU of every Kamailio process (children included) so far."""
        total = 0.0
        for process in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def statistic(self, name: str) -> int:
        """A Kamailio counter (e.g. ``rcv_replies``) read over the ctl socket with kamcmd."""
        ctl = self.workdir / "ctl.sock"
        out = subprocess.run(
            ["kamcmd", "-s", f"unix:{ctl}", "stats.get_statistics", name],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        for line in out.splitlines():
            key, _, value = line.partition("=")
            if key.strip().endswith(f":{name}"):
                return int(value.strip())
        raise RuntimeError(f"kamailio statistic {name!r} not found in {out[:200]!r}")

    def log_tail(self) -> str:
        path = self.workdir / "kamailio.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _start(
    cfg_text: str,
    workdir: Path,
    cpus: set[int] | None,
    wait_for: Sequence[tuple[str, int]],
    netns: str | None = None,
) -> KamailioProcess:
    binary = find_binary()
    if binary is None:
        raise SystemExit("kamailio not installed (Debian package kamailio)")
    cfg = workdir / "kamailio.cfg"
    cfg.write_text(cfg_text)
    log = (workdir / "kamailio.log").open("wb")
    cmd = [binary, "-DD", "-E", "-f", str(cfg), "-P", str(workdir / "kamailio.pid"), "-Y", str(workdir)]
    cmd += ["-m", "64", "-M", "8"]
    if netns:  # the caller waits for it: a bind test here would run in our own namespace
        cmd = ["ip", "netns", "exec", netns, *cmd]
        wait_for = ()

    def pin() -> None:
        if cpus:
            os.sched_setaffinity(0, cpus)

    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin
    )
    kam = KamailioProcess(proc, workdir)
    deadline = time.monotonic() + 10
    for host, port in wait_for:
        while not _udp_bound(host, port):
            if proc.poll() is not None or time.monotonic() > deadline:
                kam.stop()
                raise SystemExit(f"kamailio did not start:\n{kam.log_tail()}")
            time.sleep(0.05)
    return kam


def _udp_bound(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


@contextlib.contextmanager
def responder(
    addresses: Sequence[str],
    *,
    port: int = 5060,
    children: int = 2,
    tcp: bool = False,
    cpus: set[int] | None = None,
    netns: str | None = None,
    delay_us: int = 0,
) -> Iterator[KamailioProcess]:
    """A stateless OPTIONS responder listening on each address (UDP, and TCP if asked).

    ``delay_us`` holds every answer that long (cfgutils ``usleep``, a nanosleep in the
    worker): a known delay to measure RTT accuracy against where the kernel has no netem.
    """
    module_dir = find_module_dir()
    if module_dir is None:
        raise SystemExit("kamailio modules not found")
    listens = [f"listen=udp:{a}:{port}" for a in addresses]
    listens += [f"listen=tcp:{a}:{port}" for a in addresses] if tcp else []
    delay = f'usleep("{delay_us}");' if delay_us else ""
    text = RESPONDER_CFG.format(
        children=children, listens="\n".join(listens), module_dir=module_dir, delay=delay
    )
    with tempfile.TemporaryDirectory(prefix="hotsite-bench-kam-") as tmp:
        kam = _start(text, Path(tmp), cpus, [(a, port) for a in addresses], netns)
        try:
            yield kam
        finally:
            kam.stop()


@contextlib.contextmanager
def dispatcher_pinger(
    address: str, destinations: Sequence[str], *, cpus: set[int] | None = None
) -> Iterator[KamailioProcess]:
    """A Kamailio whose dispatcher pings every destination (``ds_ping_interval`` 1, mode 1)."""
    module_dir = find_module_dir()
    if module_dir is None:
        raise SystemExit("kamailio modules not found")
    with tempfile.TemporaryDirectory(prefix="hotsite-bench-ds-") as tmp:
        list_file = Path(tmp) / "dispatcher.list"
        list_file.write_text("".join(f"1 {uri} 0 0\n" for uri in destinations))
        ctl = Path(tmp) / "ctl.sock"
        text = PINGER_CFG.format(address=address, module_dir=module_dir, list_file=list_file, ctl_socket=ctl)
        kam = _start(text, Path(tmp), cpus, [(address, 5060)])
        try:
            yield kam
        finally:
            kam.stop()


def have_kamailio() -> bool:
    return (
        find_binary() is not None and find_module_dir() is not None and shutil.which("kamailio") is not None
    )
