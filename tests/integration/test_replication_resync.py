"""A resync after an outage sends about the pages that changed, and the source reads only those.

Issue 15: every resync rehashed the whole database at both ends, per session. The agent now keeps
following the WAL while the backup is away (a "standing" follower), so its page hashes are those
of the newest commit when the replica comes back: the pages whose hash differs from the
replica's are sent, and no other page of the source is read.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

from appliance.replication.checksum import page_hash
from appliance.replication.client import SqliteStreamClient
from appliance.replication.replica import Replica, logical_checksum
from tests.support import replication_rig

ROWS = 2000
ROW = 3000  # one row a page, near enough: updating a tenth of the rows changes a tenth of the pages


def page_hashes(db: Path) -> dict[int, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        image = conn.serialize()
    finally:
        conn.close()
    return {i + 1: page_hash(i + 1, image[i * size : (i + 1) * size]) for i in range(len(image) // size)}


def change_a_tenth(app: sqlite3.Connection) -> int:
    """Rewrite every tenth row, with a TRUNCATE checkpoint now and then; how many completed."""
    truncated = 0
    for i in range(0, ROWS, 10):
        app.execute("UPDATE customers SET note = ? WHERE id = ?", (bytes([255 - i % 251]) * ROW, i + 1))
        if i % 200 == 0:
            truncated += app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    return truncated


async def until(condition: Callable[[], object], seconds: float) -> bool:
    return await replication_rig.until(condition, seconds, interval=0.05)


def test_a_resync_after_an_outage_sends_and_reads_only_the_changed_pages(tmp_path: Path) -> None:
    certs = tmp_path / "tls"
    replication_rig.pki(certs)
    db = tmp_path / "src.db"
    app = replication_rig.blob_db(db, ROWS, ROW)

    async def scenario() -> None:
        agent = replication_rig.sqlite_agent(db, certs, heartbeat_s=0.2, poll_interval_s=0.005)
        await agent.start()
        replica = Replica(tmp_path / "rep.db", durable=False)
        replica.open()

        def client() -> SqliteStreamClient:
            return replication_rig.sqlite_client("db", replica, agent.port, certs)

        try:
            first = client()
            task = asyncio.create_task(first.run())
            assert await until(lambda: replica.checksum == logical_checksum(db), 60), "never seeded"
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert await until(lambda: "db" in agent.standing, 10), "the follower did not stay"
            follower = agent.standing["db"]
            before = page_hashes(db)
            read_before = follower.pages_read
            # The backup is down: a tenth of the rows change, the WAL restarts many times over (the
            # application runs in a thread: the agent's event loop must go on meanwhile).
            truncated = await asyncio.to_thread(change_a_tenth, app)
            after = page_hashes(db)
            changed = sum(1 for p, h in after.items() if before.get(p) != h)
            second = client()
            task = asyncio.create_task(second.run())
            want = logical_checksum(db)
            assert await until(lambda: replica.checksum == want and second.stats.batches, 60), "no catch-up"
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            read = follower.pages_read - read_before
            print(
                f"{len(after)} pages, {changed} changed; resync ({second.stats.mode}) sent"
                f" {second.stats.pages} pages, {second.stats.bytes_received} bytes; source read {read} pages"
            )
            # The WAL restarted meanwhile, but the standing follower followed it through: the
            # replica's position is one it passed, so this is a resume, not a resnapshot.
            assert second.stats.mode == "resume" and second.stats.resnapshots == 0
            assert truncated >= 5 and changed > len(after) // 20
            assert changed <= second.stats.pages <= changed + 5  # about the changed pages on the wire
            assert read <= changed + 5  # and the source read no other page of its database
            assert replica.checksum == want == replica.full_checksum()
        finally:
            await agent.stop()
            replica.close()
            app.close()

    asyncio.run(scenario())
