"""A replica changed while the daemon was down, with the primary unreachable (the DR case).

The four damages of issue 15 (a row edited with sqlite3, 16 bytes flipped, an
older copy put back, the file deleted) must be caught at start-up, before
``status`` or ``promote`` answer: status shows the damage, ``promote``
refuses (exit 1), ``promote --force-damaged`` hands the file out and says
exactly what it is. A stream that was never seeded cannot be promoted.
Real source agent, real TLS, real control socket; the CLI is the real one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from appliance.api import ApiServer
from appliance.cli.main import cli
from appliance.config import ReplicationSection
from appliance.replication.replica import logical_checksum
from appliance.replication.service import ReplicationService
from tests.support import replication_rig


def _run(args: list[str]) -> Any:
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _section(tmp_path: Path, port: int) -> ReplicationSection:
    certs = tmp_path / "tls"
    return replication_rig.section(
        port,
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


@contextlib.contextmanager
def _daemon(tmp_path: Path, *, with_source: Path | None) -> Iterator[dict[str, Any]]:
    """ReplicationService + control socket in a thread; a source agent too when ``with_source``."""
    shared: dict[str, Any] = {}
    ready, done = threading.Event(), threading.Event()
    certs = tmp_path / "tls"

    async def main() -> None:
        agent = None
        port = _free_port()  # nobody listens there: the primary is unreachable
        if with_source is not None:
            agent = replication_rig.sqlite_agent(with_source, certs, stream="customers", heartbeat_s=0.1)
            await agent.start()
            port = agent.port
        service = ReplicationService(_section(tmp_path, port))
        await service.start()
        server = ApiServer(tmp_path / "run", service.handlers())
        await server.start()
        shared["service"] = service
        shared["loop"] = asyncio.get_running_loop()
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.05)
        await server.close()
        await service.stop()
        if agent is not None:
            await agent.stop()

    thread = threading.Thread(target=lambda: asyncio.run(main()))
    thread.start()
    try:
        assert ready.wait(30)
        yield shared
    finally:
        done.set()
        thread.join(30)


def _wait(cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _source(tmp_path: Path) -> tuple[Path, sqlite3.Connection]:
    certs = tmp_path / "tls"
    replication_rig.pki(certs)
    db = tmp_path / "customers.db"
    app = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("CREATE TABLE c (id INTEGER PRIMARY KEY, name TEXT)")
    app.executemany("INSERT INTO c (name) VALUES (?)", [(f"customer {i:05d} " * 8,) for i in range(400)])
    return db, app


def _synced(shared: dict[str, Any], db: Path) -> bool:
    r = shared["service"].streams["customers"].replica
    return r is not None and r.position is not None and r.checksum == logical_checksum(db)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = 3 * 4096 + 1000
    data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["row", "flip", "older", "deleted"])
def test_damage_at_rest_is_shown_and_blocks_promotion(tmp_path: Path, damage: str) -> None:
    db, app = _source(tmp_path)
    replica = tmp_path / "rep" / "c.db"
    older = tmp_path / "older.db"
    with _daemon(tmp_path, with_source=db) as shared:
        _wait(lambda: _synced(shared, db))
        shutil.copyfile(replica, older)
        app.executemany("INSERT INTO c (name) VALUES (?)", [(f"later {i}",) for i in range(300)])
        app.execute("UPDATE c SET name = 'changed' WHERE id < 50")
        _wait(lambda: _synced(shared, db))
    app.close()
    if damage == "row":
        w = sqlite3.connect(replica, isolation_level=None)
        w.execute("UPDATE c SET name = 'edited at rest' WHERE id = 7")
        w.close()
    elif damage == "flip":
        _flip(replica)
    elif damage == "older":
        shutil.copyfile(older, replica)
    else:
        replica.unlink()
    base = ["--runtime-dir", str(tmp_path / "run"), "replication"]
    with _daemon(tmp_path, with_source=None):
        status = _run([*base, "status", "--json"])
        assert status.exit_code == 0, status.output
        stream = json.loads(status.output)["streams"][0]
        assert stream["damaged"], json.dumps(stream)
        assert "DAMAGED" in stream["last_error"]
        plain = _run([*base, "status"])
        assert "DAMAGED" in plain.output, plain.output
        refused = _run([*base, "promote", "customers", "--yes"])
        assert refused.exit_code == 1, refused.output
        assert "refusing to promote" in refused.output and "--force-damaged" in refused.output
        assert not (tmp_path / "rep" / "c.db.hotsite" / "snapshots").exists() or not any(
            (tmp_path / "rep" / "c.db.hotsite" / "snapshots").iterdir()
        ), "a damaged file was kept as a restore point"
        forced = _run([*base, "promote", "customers", "--force-damaged", "--yes"])
        assert forced.exit_code == 0, forced.output
        assert "DAMAGED" in forced.output and "not a state the primary committed" in forced.output
        assert str(replica) in forced.output


def test_a_never_seeded_stream_cannot_be_promoted(tmp_path: Path) -> None:
    _source(tmp_path)
    base = ["--runtime-dir", str(tmp_path / "run"), "replication"]
    with _daemon(tmp_path, with_source=None):
        refused = _run([*base, "promote", "customers", "--yes"])
        assert refused.exit_code == 1, refused.output
        assert "never seeded" in refused.output
        forced = _run([*base, "promote", "customers", "--force-damaged", "--yes"])
        assert forced.exit_code == 1 and "never seeded" in forced.output


def test_a_damaged_replica_repairs_itself_from_the_source_with_only_the_differing_pages(
    tmp_path: Path,
) -> None:
    db, app = _source(tmp_path)
    replica = tmp_path / "rep" / "c.db"
    with _daemon(tmp_path, with_source=db) as shared:
        _wait(lambda: _synced(shared, db))
    _flip(replica)
    with _daemon(tmp_path, with_source=db) as shared:
        _wait(lambda: _synced(shared, db) and not shared["service"].streams["customers"].replica.damage)
        status = shared["service"].status()[0]
        assert not status["damaged"] and "DAMAGED" not in status["last_error"]
        assert shared["service"].streams["customers"].stats.pages <= 2  # the one flipped page, not all
    app.close()
