"""Batches larger than one message: sent in chunks, staged on disk, committed whole, memory bounded.

The message limit is lowered to 256 KiB (the real one is 256 MiB) so that a
database of a few MB needs dozens of messages for a seed, a resume, a
resnapshot and a single large transaction. Memory is checked through
explicit counters, not timing: the largest page body the agent put in one
message, and the most bytes the appliance ever held between receiving and
applying.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from appliance.replication.client import SqliteStreamClient
from appliance.replication.replica import Replica, file_checksum, logical_checksum
from tests.integration.test_replication_link import certs, make_db
from tests.support import replication_rig

__all__ = ["certs"]  # the fixture, re-exported for pytest

LIMIT = 256 * 1024
BUFFER = 512 * 1024


class ChunkRig:
    def __init__(self, tmp: Path, certs: Path) -> None:
        self.db = tmp / "src.db"
        self.conn = make_db(self.db)
        self.conn.execute("PRAGMA wal_autocheckpoint = 0")  # the WAL keeps what a resume needs
        self.certs = certs
        self.agent = replication_rig.sqlite_agent(self.db, certs, heartbeat_s=0.1, max_message=LIMIT)
        self.rep_path = tmp / "rep" / "db.db"
        self.replica = Replica(self.rep_path)
        self.client: SqliteStreamClient | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self, **client_kw: Any) -> SqliteStreamClient:
        if not self.agent.serving:
            await self.agent.start()
        if not self.replica.is_open:
            self.replica.open()
        c = self.certs
        self.client = replication_rig.sqlite_client(
            "db", self.replica, self.agent.port, c, max_message=LIMIT, max_buffered_bytes=BUFFER, **client_kw
        )
        self.task = asyncio.create_task(self.client.run())
        return self.client

    async def stop_client(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    def fill(self, rows: int, size: int = 3000) -> None:
        """One transaction of ``rows`` rows (its frames far exceed one message)."""
        self.conn.execute("BEGIN")
        self.conn.executemany("INSERT INTO t(v) VALUES (randomblob(?))", [(size,)] * rows)
        self.conn.execute("COMMIT")

    async def caught_up(self, timeout: float = 20) -> bool:
        want = logical_checksum(self.db)
        for _ in range(int(timeout / 0.05)):
            if self.replica.position is not None and self.replica.checksum == want:
                return file_checksum(self.rep_path, 4096) == want
            await asyncio.sleep(0.05)
        return False

    def bounded(self, client: SqliteStreamClient) -> None:
        """Neither end ever held more than the bounds, whatever the batch size."""
        assert 0 < self.agent.largest_body <= LIMIT
        assert 0 < client.stats.buffered_peak_bytes <= BUFFER + LIMIT

    async def close(self) -> None:
        await self.stop_client()
        await self.agent.stop()
        self.replica.close()
        self.conn.close()


def _integrity(path: Path) -> str:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def test_seed_resume_resnapshot_and_a_huge_transaction_exceeding_the_message_limit(
    tmp_path: Path, certs: Path
) -> None:
    async def scenario() -> None:
        rig = ChunkRig(tmp_path, certs)
        rig.fill(1500)  # ~5 MB: twenty times the message limit
        client = await rig.start()
        assert await rig.caught_up(), client.stats
        assert client.stats.mode == "seed"

        # Streaming: one transaction of ~7,000 frames (more than a poll reads at once).
        rig.fill(6000)
        assert await rig.caught_up(), client.stats
        assert client.stats.chunked_batches >= 1, "the large transaction should have come in chunks"
        chunked = client.stats.chunked_batches
        rig.fill(1)  # the agent restarted the large WAL: have the replica reach the new generation
        assert await rig.caught_up(), client.stats

        # Resume: ~4 MB written while the appliance was away; the WAL still has it.
        await rig.stop_client()
        rig.fill(1200)
        client = await rig.start()
        assert await rig.caught_up(), client.stats
        assert client.stats.mode == "resume" and client.stats.chunked_batches == 1
        rig.bounded(client)

        # The WAL restarted while the appliance was away; the agent's standing follower followed it
        # through, so this is a resume from the replica's hashes (it was a resnapshot before the
        # follower remembered the positions it passed); only differing pages go, in chunks.
        await rig.stop_client()
        rig.conn.execute("UPDATE t SET v = randomblob(3000) WHERE id % 3 = 0")
        for _ in range(100):  # the agent lets go of its read hold once the session is gone
            if rig.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0:
                break
            await asyncio.sleep(0.05)
        rig.fill(10)
        client = await rig.start()
        assert await rig.caught_up(), client.stats
        assert client.stats.mode == "resume" and client.stats.chunked_batches == 1
        assert client.stats.resnapshots == 0
        rig.bounded(client)
        assert rig.agent.chunked_batches >= chunked + 2
        assert rig.replica.staged_batches >= 3
        await rig.close()
        assert _integrity(rig.rep_path) == "ok"

    asyncio.run(scenario())


def test_transfer_cut_mid_batch_leaves_the_previous_state_and_restarts_cleanly(
    tmp_path: Path, certs: Path
) -> None:
    async def scenario() -> None:
        rig = ChunkRig(tmp_path, certs)
        rig.fill(200)
        client = await rig.start()
        assert await rig.caught_up()
        await rig.stop_client()
        assert client.stats.chunked_batches == 0
        before_position, before = rig.replica.position, file_checksum(rig.rep_path, 4096)

        rig.fill(1500)  # ~5 MB to resume, sent at 2 MB/s: cut after the first chunks
        client = await rig.start(rate_bytes_s=2_000_000)
        for _ in range(200):
            if rig.replica.staged_pages > 100:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"no staged pages seen: {client.stats}")
        await rig.stop_client()  # the appliance stops mid-transfer
        rig.replica.close()

        # What a restarted appliance finds: the unfinished batch's journal was abandoned emptied
        # (its disk given back, never redone), the database untouched.
        sizes = sorted((rig.replica.dir / f"journal-{i}").stat().st_size for i in (0, 1))
        assert sizes[0] == 0, sizes
        reopened = Replica(rig.rep_path)
        reopened.open()
        assert reopened.position == before_position
        assert reopened.full_checksum() == before == reopened.checksum
        reopened.close()

        rig.replica = Replica(rig.rep_path)
        client = await rig.start()
        assert await rig.caught_up(), client.stats
        assert client.stats.mode == "resume"
        await rig.close()
        assert _integrity(rig.rep_path) == "ok"

    asyncio.run(scenario())
