"""The WAL stays bounded under a steady write load: the follower lets the application restart it
(or restarts it itself) and follows the new generation without a resnapshot; where the end of a
generation cannot be told it says so; the replica stays equal to a committed state throughout."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.replication.follower import ResnapshotNeeded, SqliteFollower
from appliance.replication.replica import Replica, logical_checksum
from appliance.replication.wal import Generation, WalFile
from appliance.replication.walguard import ReadMarkGuard
from tests.support import replication_rig

PAYLOAD = "customer record " * 8


def make_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, p TEXT)")
    return conn


def seeded(
    db: Path, replica_path: Path, checkpoint_frames: int, restart_frames: int
) -> tuple[SqliteFollower, Replica]:
    follower = SqliteFollower(db, checkpoint_frames=checkpoint_frames, restart_frames=restart_frames)
    follower.open()
    position, page_size, db_pages, pages = follower.read_state()
    replica = Replica(replica_path, durable=False)
    replica.open()
    replica.seed_begin(page_size, db_pages)
    replica.seed_pages(list(pages))
    replica.seed_end(position, follower.hashes.checksum, 0.0)
    return follower, replica


@contextlib.contextmanager
def following(
    app: sqlite3.Connection, db: Path, tmp_path: Path, **settings: int
) -> Iterator[tuple[SqliteFollower, Replica]]:
    """A follower of ``db`` and a seeded replica; both closed afterwards, and the application too."""
    follower, replica = seeded(db, tmp_path / "rep.db", **settings)
    try:
        yield follower, replica
    finally:
        follower.close()
        replica.close()
        app.close()


def drain(follower: SqliteFollower, replica: Replica) -> int:
    n = 0
    while (batch := follower.poll()) is not None:
        replica.apply(batch)
        n += 1
    return n


def commit(app: sqlite3.Connection, rows: int = 1) -> None:
    app.execute("BEGIN")
    for _ in range(rows):
        app.execute("INSERT INTO t (p) VALUES (?)", (PAYLOAD,))
    app.execute("COMMIT")


def long_wal_file(app: sqlite3.Connection, frames: int) -> None:
    """Leave the WAL file ``frames`` frames long with a short new generation in it (as a busy
    application's WAL is after its first restarts): what follows the newest frames is old."""
    app.execute("PRAGMA wal_autocheckpoint = 0")
    for _ in range(frames):
        commit(app)
    assert app.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0] == 0
    commit(app)  # restarts the WAL: a new generation over the start of the long file


def test_the_guard_blocks_restarts_and_copies_as_a_reader_would(tmp_path: Path) -> None:
    db = tmp_path / "src.db"
    app = make_db(db)
    app.execute("PRAGMA wal_autocheckpoint = 0")
    app.execute("PRAGMA busy_timeout = 0")
    for _ in range(20):
        commit(app)
    guard = ReadMarkGuard(Path(str(db) + "-shm"))
    try:
        assert guard.block_restart() and guard.hold == "restart" and guard.value == 0
        busy, frames, copied = app.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        assert (busy, copied) == (0, 0) and frames > 20  # nothing copied past mark 0
        assert app.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0] == 1  # busy: no restart
        assert guard.block_restart(10) and guard.value == 10  # another slot, then the old one let go
        assert app.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[2] == 10
        generation = WalFile(db).state()[2]
        assert guard.block_copy() and guard.hold == "copy"
        # Read-mark 0: nothing more is copied, so the WAL cannot restart either.
        assert app.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[2] == 10
        commit(app)
        assert WalFile(db).state()[2] == generation
        guard.release()
        assert app.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0] == 0
        commit(app)
        assert WalFile(db).state()[2].salt1 == generation.salt1 + 1
    finally:
        guard.close()
        app.close()


def test_our_restart_crosses_into_the_new_generation_without_resnapshot(tmp_path: Path) -> None:
    db = tmp_path / "src.db"
    app = make_db(db)
    with following(app, db, tmp_path, checkpoint_frames=50, restart_frames=0) as (follower, replica):
        for _ in range(30):
            commit(app)
        replica.apply(follower.poll())  # type: ignore[arg-type]
        assert follower.restarts == 0  # under checkpoint_frames: the WAL is only held
        before = follower.position
        assert before is not None
        # Unread commits past checkpoint_frames: read under the write lock and shipped.
        for _ in range(30):
            commit(app)
        batch = follower.poll()
        assert batch is not None and batch.position.generation == before.generation
        assert batch.position.frame >= 50 and batch.pending_frames == 0
        replica.apply(batch)
        assert follower.restarts == 1 and follower.hold == "copy"
        assert replica.checksum == logical_checksum(db)
        # The application's next commit restarts the WAL: a new generation, salt-1 plus one.
        commit(app)
        _header, mx, generation = WalFile(db).state()
        assert generation != before.generation and generation.salt1 == before.generation.salt1 + 1
        assert mx < 10
        drain(follower, replica)
        assert follower.position is not None and follower.position.generation == generation
        assert follower.hold == "restart"
        assert replica.checksum == logical_checksum(db) == replica.full_checksum()
        assert app.execute("SELECT count(*) FROM t").fetchone()[0] == 61


def test_in_a_window_the_application_restarts_the_wal_itself(tmp_path: Path) -> None:
    """The application, writing at its own pace, checkpoints and restarts its WAL itself: the
    follower's windows let its checkpoint copy everything and hand the guard over at once."""
    db = tmp_path / "src.db"
    app = make_db(db)
    with following(app, db, tmp_path, checkpoint_frames=0, restart_frames=50) as (follower, replica):
        app.execute("PRAGMA wal_autocheckpoint = 50")  # held to mark 0 outside windows: copy nothing
        generation = WalFile(db).state()[2]

        def steady() -> None:  # the application, a commit every 2 ms
            for _ in range(250):
                commit(app)
                time.sleep(0.002)

        writer = threading.Thread(target=steady)
        writer.start()
        while writer.is_alive():
            if (batch := follower.poll()) is not None:
                replica.apply(batch)
            time.sleep(0.001)
        writer.join()
        drain(follower, replica)
        assert follower.windows >= 1 and follower.window_restarts >= 1 and follower.restarts == 0
        assert follower.position is not None and follower.position.generation != generation
        assert replica.checksum == logical_checksum(db) == replica.full_checksum()


def test_a_truncate_checkpoint_in_a_window_is_followed_exactly(tmp_path: Path) -> None:
    """Issue 15: an application TRUNCATE checkpoint landing in a window (guard let go) cut the
    WAL file to nothing, and where the old generation ended "cannot be told from the file": a
    resnapshot. Now the window only lets copies through, and the WAL restarts only once every
    committed frame has been read and copied, exactly there."""
    db = tmp_path / "src.db"
    app = make_db(db)
    long_wal_file(app, 300)
    with following(app, db, tmp_path, checkpoint_frames=0, restart_frames=50) as (follower, replica):
        app.execute("PRAGMA busy_timeout = 5000")
        for _ in range(60):
            commit(app)
        result: list[tuple[int, int, int]] = []

        def later() -> None:  # commits and truncates while the follower's window is open
            time.sleep(0.01)
            commit(app, 5)
            result.append(app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
            commit(app)

        writer = threading.Thread(target=later)
        writer.start()
        while writer.is_alive():
            if (batch := follower.poll()) is not None:
                replica.apply(batch)
            time.sleep(0.001)
        writer.join()
        drain(follower, replica)
        assert result == [(0, 0, 0)]  # the checkpoint completed and emptied the WAL
        assert follower.windows >= 1 and follower.window_restarts + follower.yields >= 1
        assert replica.checksum == logical_checksum(db) == replica.full_checksum()
        assert app.execute("SELECT count(*) FROM t").fetchone()[0] == 367


def test_two_truncates_in_a_row_skip_an_empty_generation_without_a_resnapshot(tmp_path: Path) -> None:
    """The generation between two back-to-back TRUNCATE checkpoints has no frame: with read-mark 0
    held nothing of a generation can be copied, so none with frames can be skipped unseen."""
    db = tmp_path / "src.db"
    app = make_db(db)
    app.execute("PRAGMA wal_autocheckpoint = 0")
    app.execute("PRAGMA busy_timeout = 5000")
    with following(app, db, tmp_path, checkpoint_frames=0, restart_frames=0) as (follower, replica):
        for _ in range(20):
            commit(app)
        drain(follower, replica)
        before = WalFile(db).state()[2]
        results: list[int] = []

        def truncate_twice() -> None:
            for _ in range(2):
                results.append(app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0])

        checkpointer = threading.Thread(target=truncate_twice)
        checkpointer.start()
        while checkpointer.is_alive():
            assert follower.poll() is None
            time.sleep(0.01)
        assert results == [0, 0]
        commit(app)
        drain(follower, replica)
        assert follower.position is not None
        assert follower.position.generation.salt1 == (before.salt1 + 2) & 0xFFFFFFFF
        assert replica.checksum == logical_checksum(db) == replica.full_checksum()


def test_a_restart_the_guard_did_not_allow_is_a_resnapshot_not_a_guess(tmp_path: Path) -> None:
    """Someone bypassing the wal-index locks (here: the guard dropped behind the follower's back)
    can restart the WAL past unread frames; what happened then cannot be known."""
    db = tmp_path / "src.db"
    app = make_db(db)
    app.execute("PRAGMA wal_autocheckpoint = 0")
    with following(app, db, tmp_path, checkpoint_frames=0, restart_frames=0) as (follower, replica):
        for _ in range(20):
            commit(app)
        drain(follower, replica)
        follower._guard.release()
        commit(app, 5)
        assert app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        commit(app)
        with pytest.raises(ResnapshotNeeded, match="locks bypassed"):
            drain(follower, replica)


def test_an_application_truncate_checkpoint_waits_for_a_poll_not_its_busy_timeout(tmp_path: Path) -> None:
    db = tmp_path / "src.db"
    app = make_db(db)
    app.execute("PRAGMA wal_autocheckpoint = 0")
    app.execute("PRAGMA busy_timeout = 5000")
    with following(app, db, tmp_path, checkpoint_frames=0, restart_frames=0) as (follower, replica):
        for _ in range(50):
            commit(app)
        drain(follower, replica)
        result: list[tuple[int, int, int]] = []

        def truncate() -> None:
            t0 = time.monotonic()
            result.append(app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
            result.append((int((time.monotonic() - t0) * 1000), 0, 0))

        checkpointer = threading.Thread(target=truncate)
        checkpointer.start()
        while checkpointer.is_alive():  # the agent's idle polling
            assert follower.poll() is None
            time.sleep(0.01)
        assert result[0] == (0, 0, 0) and result[1][0] < 1000, result  # done, WAL empty, < 1 s
        assert follower.yields >= 1 and Path(str(db) + "-wal").stat().st_size == 0
        for _ in range(10):
            commit(app)
        drain(follower, replica)
        assert replica.checksum == logical_checksum(db) == replica.full_checksum()


def _writer(db: str, rate: float, seconds: float, result: mp.Queue) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=NORMAL")
    n = 0
    start = time.perf_counter()
    while (now := time.perf_counter()) < start + seconds:
        if n >= (now - start) * rate:
            time.sleep(0.0005)
            continue
        conn.execute("INSERT INTO t (p) VALUES (?)", (PAYLOAD,))
        n += 1
    conn.close()
    result.put(n)


def test_wal_stays_bounded_under_load_and_the_replica_follows(tmp_path: Path) -> None:
    certs = tmp_path / "tls"
    replication_rig.pki(certs)
    db = tmp_path / "src.db"
    make_db(db).close()
    restart_frames = 1000
    wal = Path(str(db) + "-wal")

    async def scenario() -> None:
        agent = replication_rig.sqlite_agent(
            db,
            certs,
            heartbeat_s=0.1,
            poll_interval_s=0.005,
            checkpoint_frames=200,
            restart_frames=restart_frames,
        )
        await agent.start()
        replica = Replica(tmp_path / "rep.db", durable=False)
        replica.open()
        client = replication_rig.sqlite_client("db", replica, agent.port, certs)
        task = asyncio.create_task(client.run())
        while replica.position is None:
            await asyncio.sleep(0.02)
        ctx = mp.get_context("spawn")
        q: mp.Queue = ctx.Queue()
        writer = ctx.Process(target=_writer, args=(str(db), 3000, 3.0, q))
        writer.start()
        generations = set()
        biggest = 0
        while writer.is_alive():
            biggest = max(biggest, wal.stat().st_size if wal.exists() else 0)
            if replica.position is not None:
                generations.add(replica.position.generation)
            await asyncio.sleep(0.02)
        written = q.get(timeout=5)
        want = logical_checksum(db)
        for _ in range(200):
            if replica.checksum == want:
                break
            await asyncio.sleep(0.05)
        followers = list(agent.followers)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await agent.stop()
        assert replica.checksum == want == replica.full_checksum()
        assert written > 6000
        restarts = followers[0].restarts + followers[0].window_restarts if followers else 0
        assert restarts >= 2, restarts
        assert len(generations) >= 3
        assert client.stats.resnapshots == 0 and client.stats.sessions == 1
        assert client.stats.checksum_mismatches == 0
        # The WAL restarted (generations, restarts above) while writes went on, without a
        # resnapshot. How large the file got first depends on the CPU the agent gets next to
        # the writer (12-35 MB seen on a loaded 2-core CI machine; the file keeps its high-water
        # size after a restart): that figure is measured by tests/benchmarks/bench_replication.py.
        print(f"largest WAL file {biggest / 1e6:.1f} MB for {written} writes")
        # A sanity bound (a hold as long as a whole catch-up would be a bug), not a figure: the
        # hold is two fsyncs, and on this 2-core machine under other jobs' I/O one took 0.7 s.
        # The benchmark reports the real holds (max and total).
        assert followers[0].restart_hold_s < 2.0
        replica.close()

    asyncio.run(scenario())


def _flat_out(db: str, seconds: float, result: mp.Queue, stop: Any = None) -> None:
    """Insert as fast as SQLite goes for ``seconds`` (or until ``stop`` is set); put the count."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=NORMAL")
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end and not (stop is not None and stop.is_set()):
        conn.execute("INSERT INTO t (p) VALUES (?)", (PAYLOAD,))
        n += 1
    conn.close()
    result.put(n)


def test_a_writer_flat_out_restarts_the_wal_in_windows_and_nothing_is_lost(tmp_path: Path) -> None:
    """Hundreds of restarts in a few seconds, each in a window the follower opened: every one
    of them must be followed without a gap (a resnapshot here is a failure)."""
    db = tmp_path / "src.db"
    make_db(db).close()
    follower, replica = seeded(db, tmp_path / "rep.db", checkpoint_frames=2000, restart_frames=1000)
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    # The writer goes flat out until ten restarts were followed in windows (3 s on an idle
    # 2-core machine; a loaded one takes longer), at most 60 s: what is asserted is that every
    # restart was followed without loss, not how many a given machine manages per second.
    stop = ctx.Event()
    writer = ctx.Process(target=_flat_out, args=(str(db), 60.0, q, stop))
    try:
        writer.start()
        generations: set[Generation] = set()
        while writer.is_alive():
            if follower.window_restarts >= 10 and len(generations) >= 10:
                stop.set()
            batch = follower.poll()
            if batch is None:
                time.sleep(0.001)
                continue
            replica.apply(batch)
            generations.add(batch.position.generation)
        written = q.get(timeout=10)
        drain(follower, replica)
        assert replica.checksum == logical_checksum(db) == replica.full_checksum()
        assert follower.window_restarts >= 10 and len(generations) >= 10
        print(
            f"{written} commits; {follower.window_restarts} restarts in windows ({follower.windows}"
            f" windows), {follower.restarts} ours, guard late {follower.guard_waits} times"
        )
    finally:
        writer.join(10)
        follower.close()
        replica.close()
