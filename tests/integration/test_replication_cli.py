"""``hotsite replication status | verify | restore`` against a real control socket served by the
replication service (no daemon: ApiServer + ReplicationService + a source agent), and the initial-sync
progress (plain lines off a terminal, a rich bar on one)."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from appliance.api import ApiServer
from appliance.cli import replication as cli_replication
from appliance.cli.main import cli
from appliance.replication.replica import logical_checksum
from appliance.replication.service import ReplicationService
from tests.support import replication_rig


def _run(args: list[str]) -> Any:
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_status_verify_restore_over_the_control_socket(tmp_path: Path) -> None:
    certs = tmp_path / "tls"
    replication_rig.pki(certs)
    db = tmp_path / "customers.db"
    app = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("CREATE TABLE c (id INTEGER PRIMARY KEY, name TEXT)")
    app.executemany("INSERT INTO c (name) VALUES (?)", [(f"customer {i}",) for i in range(200)])
    runtime = tmp_path / "run"
    results: dict[str, Any] = {}
    ready = threading.Event()
    done = threading.Event()

    async def daemonless() -> None:
        agent = replication_rig.sqlite_agent(db, certs, stream="customers", heartbeat_s=0.1)
        await agent.start()
        section = replication_rig.section(
            agent.port,
            certs,
            {
                "streams": {
                    "customers": {
                        "kind": "sqlite",
                        "source": "customers",
                        "replica": str(tmp_path / "rep" / "c.db"),
                        "snapshot_interval_s": 1,
                    }
                },
            },
        )
        service = ReplicationService(section)
        await service.start()
        server = ApiServer(runtime, service.handlers())
        await server.start()
        for _ in range(100):
            r = service.streams["customers"].replica
            if r is not None and r.position is not None and r.checksum == logical_checksum(db):
                break
            await asyncio.sleep(0.05)
        await service.tick()  # takes the first snapshot (interval 1 s)
        results["snapshot_at"] = time.time()
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.05)
        await server.close()
        await service.stop()
        await agent.stop()

    thread = threading.Thread(target=lambda: asyncio.run(daemonless()))
    thread.start()
    try:
        assert ready.wait(20)
        base = ["--runtime-dir", str(runtime), "replication"]
        status = _run([*base, "status", "--json"])
        assert status.exit_code == 0, status.output
        stream = json.loads(status.output)["streams"][0]
        assert stream["name"] == "customers" and stream["connected"] and stream["position"]
        plain = _run([*base, "status"])
        assert plain.exit_code == 0 and "customers" in plain.output and " up " in plain.output
        verify = _run([*base, "verify", "customers"])
        assert verify.exit_code == 0, verify.output
        lines = verify.output.splitlines()
        source_sum = lines[1].split()[-1]
        assert lines[2].split()[-1] == source_sum and "match" in verify.output
        assert _run([*base, "verify", "nope"]).exit_code == 1
        out = tmp_path / "restored.db"
        restore = _run(
            [*base, "restore", "customers", "--at", str(results["snapshot_at"] + 1), "-o", str(out)]
        )
        assert restore.exit_code == 0, restore.output
        assert sqlite3.connect(out).execute("SELECT count(*) FROM c").fetchone()[0] == 200
        too_early = _run([*base, "restore", "customers", "--at", "2001-01-01T00:00", "-o", str(out)])
        assert too_early.exit_code == 1
        assert _run([*base, "restore", "customers", "--at", "yesterday-ish", "-o", str(out)]).exit_code == 2
    finally:
        done.set()
        thread.join(20)
        app.close()


def _statuses(progress: list[tuple[int, int]]) -> Any:
    seq = iter(progress)

    def fetch() -> dict[str, Any]:
        done, total = next(seq)
        return {"streams": [{"name": "customers", "seed_progress": [done, total]}]}

    return fetch


def test_seed_progress_plain_lines_off_a_terminal_and_a_bar_on_one(monkeypatch: Any) -> None:
    monkeypatch.setattr(cli_replication, "SHOW_BAR_AFTER_S", 0.0)
    steps = [(100, 1000), (400, 1000), (900, 1000), (1000, 1000)]
    fetch = _statuses(steps[1:])
    runner = CliRunner()
    with runner.isolation() as (out, _err, *_rest):
        first = _statuses(steps)()
        last = cli_replication.follow_seed(fetch, first, terminal=False, interval=0, plain_every=0)
        text = out.getvalue().decode()
    assert last["streams"][0]["seed_progress"] == [1000, 1000]
    assert "customers: initial sync 100/1000 pages (10%)" in text
    assert "customers: initial sync 900/1000 pages (90%)" in text
    assert "\x1b[" not in text  # no terminal codes in a log
    # On a terminal: rich draws a bar (forced terminal so the test sees what a technician sees).
    from rich.console import Console

    buf = io.StringIO()
    monkeypatch.setattr(
        "rich.progress.get_console", lambda: Console(file=buf, force_terminal=True, width=100)
    )
    fetch = _statuses(steps[1:])
    cli_replication.follow_seed(fetch, _statuses(steps)(), terminal=True, interval=0)
    drawn = buf.getvalue()
    assert "customers initial sync" in drawn and "1000/1000" in drawn and "━" in drawn


def test_short_sync_shows_no_bar(monkeypatch: Any) -> None:
    """A sync that ends within SHOW_BAR_AFTER_S prints nothing extra."""
    fetch = _statuses([(1000, 1000)])
    buf = io.StringIO()
    from rich.console import Console

    monkeypatch.setattr(
        "rich.progress.get_console", lambda: Console(file=buf, force_terminal=True, width=100)
    )
    last = cli_replication.follow_seed(fetch, _statuses([(10, 1000)])(), terminal=True, interval=0.01)
    assert last["streams"][0]["seed_progress"] == [1000, 1000]
    assert buf.getvalue() == ""
