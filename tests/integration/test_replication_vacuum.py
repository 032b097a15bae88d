"""VACUUM and big transactions: only the pages that changed travel, and the journal is bounded.

Issue 15: a VACUUM shipped the whole file. The follower now leaves out of a batch every page the
transaction committed again exactly as the replica has it (same number, same hash): a VACUUM that
moves nothing costs a few pages, one that moves everything costs what moved. A transaction is
still applied atomically, through a journal on disk in chunks (never whole in memory); the
stream's ``journal_limit_mb`` bounds that journal: a transaction over it is refused before the
database is touched (state and position kept), the stream retries it with backoff, and it goes
through once the bound allows it, over the same live stream.

That retry hung in 2 of 3 runs: the client's reader (``SqliteStreamClient._pump``) waited for each
message with ``asyncio.wait_for``, which in Python 3.11 swallows a cancellation that lands as the
awaited message completes. A refused batch ends its session mid-transfer, while the source is still
sending chunks, so the cancellation of the reader was often swallowed: the session waited for it
forever, the refusal was never reported and no retry ever came (nor did a stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.replication.budget import MIB, JournalBudget
from appliance.replication.client import SqliteStreamClient
from appliance.replication.protocol import CHUNK_BYTES
from appliance.replication.replica import Replica, logical_checksum
from appliance.replication.source import SourceAgent
from tests.support import replication_rig

ROWS = 6000
ROW = 3000  # one row a page, near enough: ~6,000 pages (24 MB), past one chunk of WAL frames
BUFFERED = 2 * MIB  # the client's max_buffered_bytes: far less than a VACUUM's transaction


async def until(condition: Callable[[], object], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.05)
    return False


@dataclass
class Streaming:
    db: Path
    app: sqlite3.Connection
    agent: SourceAgent
    replica: Replica
    client: SqliteStreamClient

    async def caught_up(self, what: str, seconds: float = 60) -> int:
        """Wait for the replica to have the source's state (and the client to have counted it)."""
        current = logical_checksum(self.db)
        assert await until(lambda: self.replica.checksum == current, seconds), (
            f"{what}: the replica never caught up ({self.client.stats.last_error!r})"
        )
        # Counted once applied: wait for the client's counters to have the last batch too.
        assert await until(lambda: self.client.stats.batches == self.replica.batches_applied, 10), (
            "the client's counters never settled"
        )
        return current


def source_database(tmp_path: Path) -> tuple[Path, sqlite3.Connection]:
    db = tmp_path / "src.db"
    app = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("PRAGMA busy_timeout = 5000")
    app.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, note BLOB)")
    app.executemany(
        "INSERT INTO customers (note) VALUES (?)", ((bytes([i % 251]) * ROW,) for i in range(ROWS))
    )
    return db, app


@contextlib.asynccontextmanager
async def streaming(tmp_path: Path) -> AsyncIterator[Streaming]:
    """A source agent serving a database of ROWS pages and a client replicating it, seeded."""
    certs = tmp_path / "tls"
    replication_rig.pki(certs)
    db, app = source_database(tmp_path)
    agent = replication_rig.sqlite_agent(db, certs, heartbeat_s=0.2, poll_interval_s=0.005)
    await agent.start()
    replica = Replica(tmp_path / "rep.db", durable=False)
    replica.open()
    client = replication_rig.sqlite_client("db", replica, agent.port, certs, max_buffered_bytes=BUFFERED)
    task = asyncio.create_task(client.run())
    try:
        s = Streaming(db, app, agent, replica, client)
        await s.caught_up("seed")
        yield s
    finally:
        # A client that does not stop when cancelled is the bug this file once hid: bounded here,
        # and the test's own timeout (pytest-timeout) stops a hang anywhere else.
        task.cancel()
        async with asyncio.timeout(30):
            await asyncio.gather(task, return_exceptions=True)
            await agent.stop()
        replica.close()
        app.close()


def test_a_vacuum_sends_only_what_moved(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with streaming(tmp_path) as s:
            replica, client, app = s.replica, s.client, s.app

            async def vacuum(what: str) -> tuple[int, int]:
                """VACUUM at the source; (pages sent, pages in the database) once the replica has it."""
                await s.caught_up(f"{what}: before")
                sent = client.stats.pages
                await asyncio.to_thread(app.execute, "VACUUM")
                await s.caught_up(what)
                pages = replica.hashes.db_pages
                print(f"{what}: {client.stats.pages - sent} of {pages} pages sent")
                return client.stats.pages - sent, pages

            # Nothing to move: the VACUUM rewrites every page as it was; a few pages travel.
            sent, pages = await vacuum("VACUUM, nothing freed")
            assert pages > 5000 and sent < pages // 50
            # The last tenth deleted: the rest stays in place; the file shrinks.
            await asyncio.to_thread(app.execute, "DELETE FROM customers WHERE id > ?", (ROWS * 9 // 10,))
            sent, pages = await vacuum("VACUUM after deleting the last tenth")
            assert sent < pages // 20

    asyncio.run(scenario())


@pytest.mark.timeout(120)  # a hang is a failure with every thread's stack, never a stuck CI
def test_a_transaction_over_the_journal_bound_is_refused_then_applied_once_the_bound_allows(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with streaming(tmp_path) as s:
            replica, client, app = s.replica, s.client, s.app
            # Every tenth row deleted: a VACUUM then moves everything after the first hole.
            await asyncio.to_thread(app.execute, "DELETE FROM customers WHERE id % 10 = 5")
            before = await s.caught_up("the delete")
            position, slot = replica.position, replica.dir / f"journal-{replica.seq % 2}"
            kept = slot.read_bytes()  # the last transaction's journal, made before there was a bound
            refused = replica.dir / f"journal-{(replica.seq + 1) % 2}"
            applied, sessions = client.stats.batches, client.stats.sessions
            replica.budget = JournalBudget(2 * MIB)
            await asyncio.to_thread(app.execute, "VACUUM")
            want = logical_checksum(s.db)
            # Refused as it streamed live, then again by two retries (new sessions: each refused one
            # ended and the stream went on, with backoff), the replica untouched at its committed state.
            assert await until(
                lambda: (
                    client.stats.sessions >= sessions + 2 and "journal_limit_mb" in client.stats.last_error
                ),
                60,
            ), f"no refusal, then a retry refused again: {client.stats.last_error!r}"
            assert replica.checksum == before and replica.position == position
            assert client.stats.batches == applied
            assert replica.status()["disk"]["needed_bytes"] == 2 * MIB
            # The stream held still: what a refusal leaves on disk, once no retry is under way.
            client.pause()
            assert await until(lambda: not client.stats.connected and refused.stat().st_size == 0, 10)
            assert slot.read_bytes() == kept  # the refused journal emptied; the last good one kept
            assert replica.checksum == before and replica.position == position
            # The bound raised: the same transaction goes through. The replica kept its position and
            # hashes: the retry resumes from it, or, if the WAL restarted meanwhile, resyncs by page
            # hashes; either way only the pages that differ travel, never the whole database.
            replica.budget = JournalBudget(64 * MIB)
            sent = client.stats.pages
            started = time.monotonic()
            client.resume()
            assert await s.caught_up("the retry once the bound allows") == want
            assert not replica.needs_resync
            assert client.stats.pages - sent < replica.hashes.db_pages
            assert replica.checksum == replica.full_checksum()
            # In chunks, never the whole transaction (~20 MiB): the reader waits above the bound, so
            # at most one chunk message more than it is ever held.
            assert client.stats.buffered_peak_bytes <= BUFFERED + CHUNK_BYTES + 256
            print(
                f"VACUUM refused over 2 MiB, then applied {time.monotonic() - started:.1f} s after the"
                f" bound was raised: {client.stats.pages - sent} of {replica.hashes.db_pages} pages sent,"
                f" {client.stats.chunked_batches} chunked batches, buffered at most"
                f" {client.stats.buffered_peak_bytes / MIB:.1f} MiB"
            )
            # And the stream goes on as before.
            await asyncio.to_thread(app.execute, "DELETE FROM customers WHERE id % 10 = 7")
            await s.caught_up("a transaction after the retry")

    asyncio.run(scenario())
