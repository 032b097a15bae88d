"""The replication link: corruption is detected and re-requested, never applied; resume vs resnapshot;
promotion and the failback guard."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.replication.certs import issue
from appliance.replication.client import SqliteStreamClient
from appliance.replication.replica import PromotedError, Replica, file_checksum, logical_checksum
from appliance.replication.tls import client_context
from tests.support import replication_rig


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    d = tmp_path / "tls"
    replication_rig.pki(d)
    issue(d, "stranger", hosts=[], server=False)
    return d


def make_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    return conn


def truncate_checkpoint(db: Path) -> int:
    """``PRAGMA wal_checkpoint(TRUNCATE)`` as an application would run it: 0 once done, 1 if busy."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        return int(conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0])
    finally:
        conn.close()


class Rig:
    def __init__(self, tmp: Path, certs: Path, **agent_kw: Any) -> None:
        self.db = tmp / "src.db"
        self.conn = make_db(self.db)
        self.certs = certs
        self.agent = replication_rig.sqlite_agent(
            self.db, certs, allowed_clients=["appliance"], heartbeat_s=0.1, **agent_kw
        )
        self.replica = Replica(tmp / "rep" / "db.db")
        self.task: asyncio.Task[None] | None = None
        self.client: SqliteStreamClient | None = None

    async def start(self, port: int | None = None, name: str = "appliance") -> SqliteStreamClient:
        if not self.agent.serving:
            await self.agent.start()
        if not self.replica.is_open:
            self.replica.open()
        c = self.certs
        self.client = SqliteStreamClient(
            "db",
            "db",
            self.replica,
            host="127.0.0.1",
            port=port or self.agent.port,
            server_name="source",
            ssl_context=client_context(c / f"{name}.pem", c / f"{name}.key", c / "ca.pem"),
        )
        self.task = asyncio.create_task(self.client.run())
        return self.client

    async def stop_client(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task

    def write(self, n: int, size: int = 2000) -> None:
        for _i in range(n):
            self.conn.execute("INSERT INTO t(v) VALUES (?)", (os.urandom(size),))

    async def caught_up(self, timeout: float = 10) -> bool:
        want = logical_checksum(self.db)
        for _ in range(int(timeout / 0.05)):
            if self.replica.position is not None and self.replica.checksum == want:
                return True
            await asyncio.sleep(0.05)
        print("NOT CAUGHT UP:", self.client.stats if self.client else None)
        return False

    async def close(self) -> None:
        await self.stop_client()
        await self.agent.stop()
        self.replica.close()
        self.conn.close()


def test_corrupted_message_is_detected_rerequested_never_applied(tmp_path: Path, certs: Path) -> None:
    sent = {"n": 0}

    def corrupt(data: bytes) -> bytes:
        sent["n"] += 1
        if sent["n"] == 6:  # flip one bit in the payload of one message, after its CRC was computed
            i = len(data) - 10
            return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
        return data

    async def scenario() -> None:
        rig = Rig(tmp_path, certs, corrupt=corrupt)
        client = await rig.start()
        for _ in range(10):
            rig.write(5)
            await asyncio.sleep(0.05)
        assert await rig.caught_up()
        assert client.stats.corrupt_messages == 1
        assert client.stats.sessions >= 2  # it reconnected and resumed from its position
        assert client.stats.checksum_mismatches == 0
        assert file_checksum(rig.replica.path, 4096) == logical_checksum(rig.db)
        await rig.close()

    asyncio.run(scenario())


async def _flipping_proxy(target_port: int, flip_after: int) -> tuple[asyncio.Server, dict[str, int]]:
    """A TCP proxy that flips one byte of the TLS stream (source to appliance) once."""
    state = {"flipped": 0, "bytes": 0}

    async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, corrupting: bool) -> None:
        with contextlib.suppress(Exception):
            while data := await r.read(65536):
                if corrupting and not state["flipped"] and state["bytes"] + len(data) > flip_after:
                    i = flip_after - state["bytes"]
                    data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
                    state["flipped"] = 1
                if corrupting:
                    state["bytes"] += len(data)
                w.write(data)
                await w.drain()
        w.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(cr, sw, False), pipe(sr, cw, True))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, state


def test_corruption_on_the_wire_breaks_tls_then_resumes(tmp_path: Path, certs: Path) -> None:
    async def scenario() -> None:
        rig = Rig(tmp_path, certs)
        await rig.agent.start()
        proxy, state = await _flipping_proxy(rig.agent.port, flip_after=20_000)
        client = await rig.start(port=proxy.sockets[0].getsockname()[1])
        for _ in range(20):
            rig.write(5)
            await asyncio.sleep(0.03)
        assert await rig.caught_up()
        assert state["flipped"] == 1
        assert client.stats.sessions >= 2
        assert file_checksum(rig.replica.path, 4096) == logical_checksum(rig.db)
        proxy.close()
        await rig.close()

    asyncio.run(scenario())


def test_unknown_client_certificate_is_refused(tmp_path: Path, certs: Path) -> None:
    async def scenario() -> None:
        rig = Rig(tmp_path, certs)
        rig.write(3)
        client = await rig.start(name="stranger")
        await asyncio.sleep(0.5)
        assert rig.replica.position is None and client.stats.sessions == 0
        await rig.close()

    asyncio.run(scenario())


def test_resume_without_copy_then_resume_after_a_wal_restart_while_away(tmp_path: Path, certs: Path) -> None:
    async def scenario() -> None:
        rig = Rig(tmp_path, certs)
        rig.write(200)
        client = await rig.start()
        assert await rig.caught_up()
        assert client.stats.mode == "seed"
        await rig.stop_client()
        rig.write(3)  # while disconnected; the WAL still holds these frames
        client = await rig.start()
        assert await rig.caught_up()
        assert client.stats.mode == "resume" and client.stats.pages < 10
        await rig.stop_client()
        rig.write(3)
        # The application's TRUNCATE checkpoint, from its own connection and thread as in a real
        # application: the agent's standing follower hands the WAL over (a window) and it succeeds.
        # (Run on this event loop's thread, it would block the very loop the follower needs.)
        assert await asyncio.to_thread(truncate_checkpoint, rig.db) == 0
        rig.write(2)  # a new WAL generation the replica never saw the start of
        client = await rig.start()
        assert await rig.caught_up()
        # The standing follower followed the restart: the replica's position is one it passed, so
        # this is a resume from the replica's page hashes (before, a resnapshot).
        assert client.stats.mode == "resume" and client.stats.resnapshots == 0
        assert client.stats.pages < 20, "only the pages that differ are sent"
        await rig.close()

    asyncio.run(scenario())


def test_promotion_reports_loss_window_and_failback_refuses_to_overwrite(tmp_path: Path, certs: Path) -> None:
    from appliance.replication.promotion import data_loss_window

    async def scenario() -> None:
        rig = Rig(tmp_path, certs)
        rig.write(20)
        client = await rig.start()
        assert await rig.caught_up()
        await asyncio.sleep(0.3)  # heartbeats: the replica knows it is current
        await rig.stop_client()
        now = time.time()  # the replica's clock (its default)
        window = data_loss_window(client.stats.current_at, now, client.stats.clock_offset_s)
        assert window is not None and 0 <= window < 2
        promotion = rig.replica.promote(window, reason="test")
        assert promotion.position == rig.replica.position
        at = rig.replica.position
        assert at is not None
        with pytest.raises(PromotedError):
            from appliance.replication.position import Batch

            rig.replica.apply(Batch("tx", at, at, 4096, 1, 1, 0, 0.0))
        # The backup writes to its promoted copy.
        w = sqlite3.connect(rig.replica.path, isolation_level=None)
        w.execute("INSERT INTO t(v) VALUES (x'00')")
        w.close()
        with pytest.raises(PromotedError, match="refusing to resume replication"):
            rig.replica.demote()
        rig.replica.demote(discard_local_writes=True)
        await rig.start()
        assert await rig.caught_up()
        await rig.close()

    asyncio.run(scenario())
