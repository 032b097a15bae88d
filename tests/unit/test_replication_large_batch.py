"""A large transaction is hashed while it is sent, and a follower is never left at half a state.

Real SQLite files, no sockets: the follower's batch is consumed the way the agent sends it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from appliance.replication.follower import SqliteFollower
from appliance.replication.position import Position

ROWS = 8000


def _app(db: Path) -> sqlite3.Connection:
    app = sqlite3.connect(db, isolation_level=None)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, b BLOB)")
    app.executemany("INSERT INTO t (b) VALUES (?)", ((bytes([i % 250]) * 3000,) for i in range(ROWS)))
    return app


def _following(db: Path) -> SqliteFollower:
    follower = SqliteFollower(db)
    follower.open()
    _pos, _size, _pages, pages = follower.read_state()
    for _ in pages:
        pass
    assert follower.has_state()
    return follower


def _drain(follower: SqliteFollower) -> None:
    while follower.poll() is not None:
        pass


def test_a_vacuum_is_sent_hashed_on_the_way_with_the_sources_checksum(tmp_path: Path) -> None:
    app = _app(tmp_path / "s.db")
    follower = _following(tmp_path / "s.db")
    try:
        app.execute("DELETE FROM t WHERE id > ? ", (ROWS - ROWS // 10,))  # the last tenth: little moves
        _drain(follower)
        app.execute("VACUUM")
        batch = follower.poll()
        assert batch is not None and batch.page_reader is not None, "expected a lazy batch"
        sent = list(batch.iter_pages())
        _pos, full = follower.full_checksum()
        assert batch.checksum == follower.hashes.checksum == full
        assert [p for p, _ in sent] == sorted(p for p, _ in sent)
        assert len(sent) < batch.page_count // 10, "pages the VACUUM left in place must not be sent"
    finally:
        follower.close()
        app.close()


def test_a_batch_left_half_sent_is_completed_by_the_next_poll(tmp_path: Path) -> None:
    app = _app(tmp_path / "s.db")
    follower = _following(tmp_path / "s.db")
    try:
        app.execute("DELETE FROM t WHERE id % 7 = 0")  # holes throughout: the VACUUM moves most pages
        _drain(follower)
        app.execute("VACUUM")
        batch = follower.poll()
        assert batch is not None and batch.page_reader is not None
        pages = batch.iter_pages()
        for _ in zip(range(1000), pages, strict=False):
            pass  # the session ends here: the rest is never sent
        app.execute("INSERT INTO t (b) VALUES (x'00')")
        _drain(follower)
        _pos, full = follower.full_checksum()
        assert follower.has_state() and follower.hashes.checksum == full
    finally:
        follower.close()
        app.close()


def test_a_seed_cut_half_way_leaves_no_state(tmp_path: Path) -> None:
    app = _app(tmp_path / "s.db")
    follower = SqliteFollower(tmp_path / "s.db")
    follower.open()
    try:
        _pos, _size, _pages, pages = follower.read_state()
        for _ in zip(range(10), pages, strict=False):
            pass
        assert not follower.has_state(), "half the hashes must not pass for a state"
        for _ in pages:
            pass
        assert follower.has_state()
    finally:
        follower.close()
        app.close()


def test_positions_followed_through_a_truncate_are_resumable(tmp_path: Path) -> None:
    app = _app(tmp_path / "s.db")
    app.close()
    follower = _following(tmp_path / "s.db")
    try:
        writer = sqlite3.connect(tmp_path / "s.db", isolation_level=None, check_same_thread=False)
        writer.execute("PRAGMA busy_timeout = 5000")
        writer.execute("INSERT INTO t (b) VALUES (x'01')")
        _drain(follower)
        before = follower.position
        assert before is not None and follower.followed(before)
        # The application's TRUNCATE waits for the follower to make way (it polls meanwhile).
        done: list[int] = []
        thread = threading.Thread(
            target=lambda: done.append(writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0])
        )
        thread.start()
        deadline = time.monotonic() + 30
        while thread.is_alive() and time.monotonic() < deadline:
            _drain(follower)
            time.sleep(0.002)
        thread.join()
        assert done == [0], "the TRUNCATE did not complete"
        writer.execute("INSERT INTO t (b) VALUES (x'02')")
        _drain(follower)
        writer.close()
        assert follower.position is not None and follower.position.generation != before.generation
        assert follower.followed(before)  # a past generation, followed to its end
        assert not follower.followed(Position(before.generation, before.frame + 10**6))
        assert not follower.followed(Position(follower.position.generation, follower.position.frame + 1))
    finally:
        follower.close()
