"""A real partition between the source agent and the appliance: packets dropped, nothing closed.

The agent runs in one network namespace, the appliance (replica, behind the
user-space proxy that delays every byte by 20 ms each way: this kernel has no
netem) in another, joined by a veth pair. nftables in the agent's namespace
then drops every packet both ways. Neither side sees a FIN or a reset: the
appliance must notice the silence (no heartbeat for its idle timeout), the
agent must notice that keepalives stopped (and let go of its read hold on
the WAL), and after the heal the appliance must reconnect and *resume* from
its own position (the source still has the WAL) without a resnapshot, ending
equal to the source's checksum.

Names are per process (hsrp-*-<pid>) and the subnet is not the lab's, so this
runs beside the lab tests without their lock.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.replication.replica import Replica, file_checksum, logical_checksum
from tests.conftest import REPO
from tests.support import replication_rig

PY = sys.executable
PORT = 7450
IDLE_TIMEOUT_S = 2.0  # appliance: no message for this long = dead path
PEER_TIMEOUT_S = 2.0  # agent: no keepalive for this long = dead path
DELAY_S = 0.020

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"),
    reason="needs root, iproute2 and nftables (network namespaces)",
)


# ---------------------------------------------------------------------------
# The two ends, each run in its own namespace (python -m this module agent|replica ...)


def agent_main(db: Path, host: str, certs: Path) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")

    agent = replication_rig.sqlite_agent(
        db, certs, host=host, port=PORT, heartbeat_s=0.2, peer_timeout_s=PEER_TIMEOUT_S
    )
    asyncio.run(agent.serve_forever())


def replica_main(rep: Path, agent_host: str, certs: Path, status: Path) -> None:
    from tests.benchmarks.bench_replication import _delay_proxy

    async def run() -> None:
        proxy = await _delay_proxy(PORT, host=agent_host, delay_s=DELAY_S)
        replica = Replica(rep)
        replica.open()
        client = replication_rig.sqlite_client(
            "db",
            replica,
            proxy.sockets[0].getsockname()[1],
            certs,
            keepalive_s=0.5,
            idle_timeout_s=IDLE_TIMEOUT_S,
        )
        task = asyncio.create_task(client.run())
        modes: list[str] = []
        sessions = 0
        while not task.done():
            st = client.stats
            if st.sessions != sessions:
                sessions = st.sessions
                modes.append(st.mode)
            report = {
                "checksum": f"{replica.checksum:016x}",
                "position": None if replica.position is None else str(replica.position),
                "connected": st.connected,
                "modes": modes,
                "resnapshots": st.resnapshots,
                "seeds": st.seeds,
                "idle_timeouts": st.idle_timeouts,
                "last_error": st.last_error,
            }
            tmp = status.with_suffix(".tmp")
            tmp.write_text(json.dumps(report))
            tmp.replace(status)
            await asyncio.sleep(0.1)
        await task

    asyncio.run(run())


# ---------------------------------------------------------------------------
# Namespaces


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class Link:
    """Two namespaces joined by a veth pair; ``cut``/``heal`` drop all traffic with nftables."""

    def __init__(self) -> None:
        n = os.getpid() % 100_000
        self.src, self.app = f"hsrp-s-{n}", f"hsrp-a-{n}"
        self.subnet = f"10.233.{n % 250}"
        self.src_ip, self.app_ip = f"{self.subnet}.1", f"{self.subnet}.2"
        self.veth = (f"hsrps{n}", f"hsrpa{n}")

    def up(self) -> None:
        sh("ip", "netns", "add", self.src)
        sh("ip", "netns", "add", self.app)
        sh(
            "ip",
            "link",
            "add",
            self.veth[0],
            "netns",
            self.src,
            "type",
            "veth",
            "peer",
            "name",
            self.veth[1],
            "netns",
            self.app,
        )
        for ns, dev, ip in ((self.src, self.veth[0], self.src_ip), (self.app, self.veth[1], self.app_ip)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def cut(self) -> None:
        ruleset = (
            "table inet hsrp_cut {\n"
            f" chain i {{ type filter hook input priority -10; policy accept; iifname {self.veth[0]} drop; }}\n"
            f" chain o {{ type filter hook output priority -10; policy accept; oifname {self.veth[0]} drop; }}\n"
            "}\n"
        )
        subprocess.run(
            ["ip", "netns", "exec", self.src, "nft", "-f", "-"], input=ruleset.encode(), check=True
        )

    def heal(self) -> None:
        sh("ip", "netns", "exec", self.src, "nft", "delete", "table", "inet", "hsrp_cut")

    def down(self) -> None:
        for ns in (self.src, self.app):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def spawn(self, ns: str, *args: str, stderr: Path) -> subprocess.Popen[bytes]:
        with open(stderr, "wb") as err:
            return subprocess.Popen(
                ["ip", "netns", "exec", ns, PY, "-m", "tests.integration.test_replication_partition", *args],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )


def wait_for(what: str, check: object, timeout: float) -> float:
    """Seconds until ``check()`` is true; fails the test with ``what`` after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():  # type: ignore[operator]
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def test_partition_detected_both_ways_then_resume_without_resnapshot(tmp_path: Path) -> None:
    link = Link()
    certs = tmp_path / "tls"
    replication_rig.pki(certs, source_hosts=[link.src_ip])
    db, rep, status = tmp_path / "src.db", tmp_path / "rep" / "db.db", tmp_path / "status.json"
    app = sqlite3.connect(db, isolation_level=None)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("PRAGMA wal_autocheckpoint=0")  # the WAL keeps what a resume needs
    app.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")

    def write(n: int) -> None:
        for _ in range(n):
            app.execute("INSERT INTO t(v) VALUES (randomblob(500))")

    def replica() -> dict[str, Any]:
        try:
            return dict(json.loads(status.read_text()))
        except (FileNotFoundError, ValueError):
            return {}

    def equal() -> bool:
        return replica().get("checksum") == f"{logical_checksum(db):016x}"

    procs: list[subprocess.Popen[bytes]] = []
    link.up()
    try:
        write(50)
        procs.append(
            link.spawn(link.src, "agent", str(db), link.src_ip, str(certs), stderr=tmp_path / "agent.log")
        )
        procs.append(
            link.spawn(
                link.app,
                "replica",
                str(rep),
                link.src_ip,
                str(certs),
                str(status),
                stderr=tmp_path / "replica.log",
            )
        )
        wait_for("initial seed", equal, 15)
        write(20)
        wait_for("streaming before the partition", equal, 5)

        link.cut()
        write(30)  # committed at the source while the path drops everything
        detected = wait_for(
            "the appliance noticing the silence",
            lambda: replica().get("idle_timeouts", 0) >= 1,
            3 * IDLE_TIMEOUT_S,
        )
        wait_for(
            "the agent ending the silent session",
            lambda: "replica silent" in (tmp_path / "agent.log").read_text(),
            3 * PEER_TIMEOUT_S,
        )
        assert not equal(), "nothing can have crossed a cut path"
        time.sleep(0.5)
        write(10)

        link.heal()
        healed = wait_for("catching up after the heal", equal, 20)
        state = replica()
        assert state["modes"][0] == "seed" and state["modes"][-1] == "resume", state
        assert state["resnapshots"] == 0 and state["seeds"] == 1, state
        assert file_checksum(rep, 4096) == logical_checksum(db)
        print(
            f"partition noticed after {detected:.1f} s; caught up {healed:.1f} s after the heal; sessions {state['modes']}"
        )
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
        link.down()
        app.close()


if __name__ == "__main__":
    if sys.argv[1] == "agent":
        agent_main(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    elif sys.argv[1] == "replica":
        replica_main(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]))
