"""No resnapshot without a fault: the application's TRUNCATE checkpoints and VACUUMs are followed.

Issue 15 saw 10 resnapshots "continuity lost ... cannot be told from the file" within 0.5 s of an
application ``wal_checkpoint(TRUNCATE)``, and 5 "every read-mark slot ... stayed busy for a
second" right after a VACUUM, with no fault injected. Here a writer process does what that
application did (small customer rows, ~300 KB blobs, deletes, a TRUNCATE checkpoint after 1% of
its transactions, a VACUUM every 1,500) while the real agent and replica follow it over mutual
TLS: over 10,000 transactions not one session may end in a resnapshot, and the replica must end
equal to the source.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import sqlite3
import time
from pathlib import Path

from appliance.replication.replica import Replica, logical_checksum
from tests.support import replication_rig

BLOB = 300_000
RATE = 200.0
# A transaction in ten carries a blob: about 8 WAL frames a transaction, so the WAL passes the
# application's auto-checkpoint threshold between two TRUNCATE checkpoints (as in the issue's
# workload, 1.4 GB over 20,000 transactions), and the follower's windows open between them.
BLOBS = 0.10


def crm_writer(db: str, transactions: int, seed: int, rate: float, done: mp.Queue) -> None:
    """The issue's workload, ``transactions`` commits (``rate`` per second, 0: flat out).

    Puts (commits, TRUNCATE checkpoints done, VACUUMs done) when finished.
    """
    rnd = random.Random(seed)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    truncates = vacuums = 0
    start = time.perf_counter()
    for n in range(1, transactions + 1):
        if rate:
            ahead = start + n / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        conn.execute("BEGIN IMMEDIATE")
        kind = rnd.random()
        if kind < BLOBS:
            conn.execute("INSERT INTO customers (name, note) VALUES (?, ?)", (f"c{n}", rnd.randbytes(BLOB)))
        elif kind < 0.6:
            conn.execute("INSERT INTO customers (name, note) VALUES (?, ?)", (f"c{n}", rnd.randbytes(200)))
        elif kind < 0.85:
            conn.execute(
                "UPDATE customers SET name = ? WHERE id = (SELECT max(id) - ? FROM customers)",
                (f"u{n}", rnd.randrange(50)),
            )
        else:
            # Keep the database at a steady size: the oldest rows go (blobs included).
            conn.execute("DELETE FROM customers WHERE id IN (SELECT id FROM customers ORDER BY id LIMIT 6)")
        conn.execute("COMMIT")
        if n % 1500 == 0:
            conn.execute("VACUUM")
            vacuums += 1
        elif rnd.random() < 0.01:
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            truncates += busy == 0
    conn.close()
    done.put((transactions, truncates, vacuums))


def test_truncate_checkpoints_and_vacuums_never_cost_a_resnapshot(tmp_path: Path) -> None:
    certs = tmp_path / "tls"
    replication_rig.pki(certs)
    db = tmp_path / "src.db"
    init = sqlite3.connect(db, isolation_level=None)
    init.execute("PRAGMA journal_mode=WAL")
    init.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, note BLOB)")
    init.executemany(
        "INSERT INTO customers (name, note) VALUES (?, ?)", ((f"s{i}", bytes(200)) for i in range(2000))
    )
    init.close()

    async def scenario() -> None:
        agent = replication_rig.sqlite_agent(db, certs, heartbeat_s=0.2, poll_interval_s=0.005)
        await agent.start()
        replica = Replica(tmp_path / "rep.db", durable=False)
        replica.open()
        client = replication_rig.sqlite_client("db", replica, agent.port, certs)
        task = asyncio.create_task(client.run())
        try:
            deadline = time.monotonic() + 60
            while replica.position is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert replica.position is not None, "never seeded"
            ctx = mp.get_context("spawn")
            done: mp.Queue = ctx.Queue()
            writer = ctx.Process(target=crm_writer, args=(str(db), 10_500, 15, RATE, done))
            writer.start()
            await asyncio.to_thread(writer.join, 900)
            assert writer.exitcode == 0, writer.exitcode
            written, truncates, vacuums = done.get(timeout=5)
            want = logical_checksum(db)
            deadline = time.monotonic() + 120
            while replica.checksum != want and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            f = next(iter(agent.followers), None)
            if f is not None:
                print(
                    f"windows {f.windows}, restarts in them {f.window_restarts}, ours {f.restarts},"
                    f" yields {f.yields}, guard waits {f.guard_waits}"
                )
            print(
                f"{written} transactions, {truncates} TRUNCATE checkpoints, {vacuums} VACUUMs;"
                f" sessions {client.stats.sessions}, resnapshots {client.stats.resnapshots},"
                f" continuity lost {agent.continuity_lost}, last error {client.stats.last_error!r}"
            )
            assert written >= 10_000 and truncates >= 50 and vacuums >= 6
            assert agent.continuity_lost == 0
            assert client.stats.resnapshots == 0 and client.stats.sessions == 1
            assert replica.checksum == want == replica.full_checksum()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await agent.stop()
            replica.close()

    asyncio.run(scenario())
