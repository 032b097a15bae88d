"""Reading the end of a WAL generation from the file alone, by SQLite's recovery rule.

After a restart the wal-index no longer says where the old generation ended;
the follower finds it from the frames' salts and checksum chain. These tests
write real WALs with SQLite and check the reader against what SQLite itself
reported as committed (the wal-index's mxFrame after each commit).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.replication.wal import FRAME_HEADER_SIZE, WalFile, frame_offset


def write(db: Path, sizes: list[int], blob: int = 300) -> tuple[sqlite3.Connection, list[int]]:
    """One transaction of ``n`` rows per entry; the committed frame after each (from the wal-index)."""
    app = sqlite3.connect(db, isolation_level=None)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("PRAGMA wal_autocheckpoint = 0")
    app.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, p BLOB)")
    commits = []
    for n in sizes:
        app.execute("BEGIN")
        app.executemany("INSERT INTO t (p) VALUES (?)", ((os.urandom(blob),) for _ in range(n)))
        app.execute("COMMIT")
        commits.append(WalFile(db).state()[1])
    return app, commits


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=2, max_size=12), pick=st.integers(0, 10_000))
def test_the_tail_is_exactly_the_committed_frames_after_a_commit(sizes: list[int], pick: int) -> None:
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"wal-tail-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        db = work / "a.db"
        app, commits = write(db, sizes)
        wal = WalFile(db)
        header, mx, _generation = wal.state()
        assert header is not None and mx == commits[-1]
        after = commits[pick % (len(commits) - 1)]
        frames, end = wal.tail(header, after)
        assert [f.index for f in frames] == list(range(after + 1, mx + 1))
        assert frames[-1].commit_size and end == "eof"
        assert {f.index for f in frames if f.commit_size} == {c for c in commits if c > after}
        wal.close()
        app.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_older_frames_after_the_end_say_the_end_is_certain(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    app, _ = write(db, [1] * 200)  # a long file
    assert app.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0] == 0
    commits = []
    for n in (3, 5, 2):
        app.execute("BEGIN")
        app.executemany("INSERT INTO t (p) VALUES (?)", ((os.urandom(300),) for _ in range(n)))
        app.execute("COMMIT")
        commits.append(WalFile(db).state()[1])
    wal = WalFile(db)
    header, mx, _generation = wal.state()
    assert header is not None
    frames, end = wal.tail(header, commits[0])
    assert end == "stale" and [f.index for f in frames] == list(range(commits[0] + 1, mx + 1))
    app.close()


def test_a_damaged_frame_ends_the_generation_before_it(tmp_path: Path) -> None:
    """A frame whose checksum chain breaks is not the generation's (a torn or rolled-back write):
    neither it nor anything after it is taken, and the transaction it belonged to is dropped whole."""
    db = tmp_path / "a.db"
    app, commits = write(db, [2, 4, 3], blob=3000)  # several frames per transaction
    header, mx, _generation = WalFile(db).state()
    assert header is not None
    copy = tmp_path / "copy"
    copy.mkdir()
    for suffix in ("", "-wal", "-shm"):
        shutil.copyfile(str(db) + suffix, str(copy / "a.db") + suffix)
    damaged = commits[1] + 2  # the second frame of the third transaction
    assert commits[2] > damaged
    with open(str(copy / "a.db") + "-wal", "r+b") as f:
        at = frame_offset(damaged, header.page_size) + FRAME_HEADER_SIZE + 100
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x01]))
    frames, end = WalFile(copy / "a.db").tail(header, commits[0])
    assert end == "stale" and [f.index for f in frames] == list(range(commits[0] + 1, commits[1] + 1))
    frames, end = WalFile(db).tail(header, commits[0])  # the undamaged original: everything
    assert end == "eof" and frames[-1].index == mx
    app.close()
