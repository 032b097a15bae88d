"""Issue 19: the lab's primary replicates. ``hotsite lab up --with-replication`` (what the demo
turns on) runs the real ``hotsite source`` and a CRM writer in the primary's namespace, recorded
in lab.json like its SIPp and healthd; the daemon on the generated config follows the writer over
mutual TLS (the replica's row count catches up, the dialplans arrive); ``hotsite lab down``
leaves no process behind.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from provisioning.lab import replication as lab_repl
from tests.conftest import free_port
from tests.integration.daemon_helpers import RunningDaemon, hotsite, wait_for
from tests.support import lab as lab_rig

pytestmark = lab_rig.marks(pytest.mark.slow)

HOTSITE = [sys.executable, "-m", "appliance.cli.main"]


def _lab(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*HOTSITE, "lab", args[0], "--workdir", str(workdir), *args[1:]],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(params=["netns", "loopback"])
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """The lab in both modes: namespaces, and the loopback fallback (127.77.0.x, no namespaces)."""
    workdir = tmp_path / "lab"
    up = _lab(workdir, "up", "--mode", request.param, "--with-replication", "--metrics-listen",
              f"127.0.0.1:{free_port()}")  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield workdir
    finally:
        _lab(workdir, "down")


def _tickets(db: Path) -> int | None:
    """Rows in a database another process is writing; None while a read lands mid-write.

    ``immutable=1``: no -shm or -wal is made beside the replica (the replica would call
    writes in a -wal damage), and no lock is taken.
    """
    try:
        with sqlite3.connect(f"file:{db}?immutable=1", uri=True) as conn:
            return int(conn.execute("SELECT count(*) FROM tickets").fetchone()[0])
    except sqlite3.DatabaseError:
        return None


def _streams(config: Path) -> dict[str, dict[str, Any]]:
    proc = hotsite("replication", "status", "--json", config=config)
    return {s["name"]: s for s in json.loads(proc.stdout)["streams"]} if proc.returncode == 0 else {}


def test_source_and_writer_run_at_the_primary_and_the_replica_follows(lab: Path, tmp_path: Path) -> None:
    info = json.loads(_lab(lab, "status", "--json").stdout)
    primary = next(h for h in info["hosts"] if h["name"] == "primary")
    procs = {p["name"]: p for p in primary["processes"]}
    assert {"source", "crm-writer"} <= set(procs), procs
    assert all(procs[n]["alive"] for n in ("source", "crm-writer"))
    assert primary["ports"]["replication"] == lab_repl.PORT
    ours = os.readlink("/proc/self/ns/net")  # "net:[4026531833]": the namespace's identity
    for name in ("source", "crm-writer"):  # netns: in the primary's namespace, not the appliance's
        theirs = os.readlink(f"/proc/{procs[name]['pid']}/ns/net")
        assert (theirs != ours) == (info["mode"] == "netns"), (name, theirs, ours)
    repl = info["replication"]
    assert repl["source_agent"] == f"{primary['address']}:{lab_repl.PORT}"
    source_db = Path(repl["streams"]["crm"]["path"])
    config = lab / "hotsite.toml"
    assert "[replication.streams.crm]" in config.read_text()

    daemon = RunningDaemon(config, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        streams = wait_for(
            lambda: (
                (s := _streams(config))
                and all(x["connected"] and x["lag_s"] is not None and x["lag_s"] < 3 for x in s.values())
                and s
            ),
            timeout=60,
            what="both streams connected and caught up",
            on_fail=lambda: daemon.log.read_text()[-3000:],
        )
        assert set(streams) == {"crm", "dialplans"}
        replica = Path(streams["crm"]["replica"])
        # The writer keeps committing; the replica catches up with what the primary had, and more.
        at_primary = _tickets(source_db)
        assert at_primary is not None and at_primary >= 200
        wait_for(lambda: (_tickets(replica) or 0) >= at_primary + 3, timeout=30,
                 what=f"the replica past {at_primary + 3} tickets")  # fmt: skip
        verify = hotsite("replication", "verify", "crm", config=config)
        assert verify.returncode == 0 and "match" in verify.stdout, verify.stdout + verify.stderr
        # The config tree arrives whole, and a change at the primary follows.
        tree, copy = Path(repl["streams"]["dialplans"]["path"]), Path(streams["dialplans"]["replica"])
        wait_for(lambda: (copy / "ivr" / "vip.conf").is_file(), what="the dialplans at the backup")
        (tree / "extensions.conf").write_text("[hotlines]\nexten => 95588,1,Goto(vip-overflow,s,1)\n")
        wait_for(lambda: "vip-overflow" in (copy / "extensions.conf").read_text(), timeout=20,
                 what="the changed dialplan at the backup")  # fmt: skip
    finally:
        assert daemon.stop() == 0

    pids = [int(procs[n]["pid"]) for n in ("source", "crm-writer")]
    down = _lab(lab, "down")
    assert down.returncode == 0, down.stderr
    assert "stopped source on primary" in down.stdout and "stopped crm-writer on primary" in down.stdout
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    leftovers = [
        p.pid for p in psutil.process_iter(["cmdline"]) if str(lab) in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []
    assert not lab.exists(), sorted(str(p) for p in lab.rglob("*"))
