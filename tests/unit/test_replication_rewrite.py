"""A staged batch that rewrites most of the database is applied by building a new file.

Real SQLite files and a real follower, no sockets: the batch is staged the way the
client stages it (BATCH_BEGIN header, chunks of pages, the checksum last). The crash
test SIGKILLs a replica process at every write, fsync, truncate and rename of the
apply in turn and checks that what recovery opens is exactly one committed state.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.replication.budget import JournalBudget
from appliance.replication.checksum import show
from appliance.replication.follower import SqliteFollower
from appliance.replication.position import Position
from appliance.replication.replica import BatchRejected, Replica, file_checksum, image_checksum

ROWS = 3000
PER_CHUNK = 256


@dataclass
class Staged:
    header: dict[str, Any]
    chunks: list[list[tuple[int, bytes]]]
    checksum: int
    observed_at: float


def _app(db: Path) -> sqlite3.Connection:
    app = sqlite3.connect(db, isolation_level=None)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, b BLOB)")
    app.executemany("INSERT INTO t (b) VALUES (?)", ((bytes([i % 250]) * 3000,) for i in range(ROWS)))
    return app


def _seeded(db: Path, rep_path: Path) -> tuple[SqliteFollower, Replica]:
    follower = SqliteFollower(db)
    follower.open()
    pos, size, db_pages, pages = follower.read_state()
    replica = Replica(rep_path)
    replica.open()
    replica.seed_begin(size, db_pages)
    replica.seed_pages(pages)
    replica.seed_end(pos, follower.hashes.checksum, 0.0)
    return follower, replica


def _drain_into(follower: SqliteFollower, replica: Replica) -> None:
    while (batch := follower.poll()) is not None:
        _apply(replica, _staged(batch))


def _staged(batch: Any) -> Staged:
    pages = list(batch.iter_pages())
    chunks = [pages[i : i + PER_CHUNK] for i in range(0, len(pages), PER_CHUNK)] or [[]]
    header = {**batch.header(), "checksum": None, "page_count": batch.page_count or len(batch.pages)}
    return Staged(header, chunks, batch.checksum, batch.observed_at or 0.0)


def _apply(replica: Replica, staged: Staged) -> None:
    replica.stage_begin(staged.header)
    for chunk in staged.chunks:
        replica.stage_pages(chunk)
    replica.stage_commit(staged.checksum, staged.observed_at)


def _vacuum_batch(
    tmp_path: Path, delete: str
) -> tuple[Path, Replica, Staged, sqlite3.Connection, SqliteFollower]:
    db = tmp_path / "src.db"
    app = _app(db)
    follower, replica = _seeded(db, tmp_path / "rep.db")
    app.execute(f"DELETE FROM t WHERE {delete}")
    _drain_into(follower, replica)
    app.execute("VACUUM")
    batch = follower.poll()
    assert batch is not None
    return db, replica, _staged(batch), app, follower


def test_a_vacuum_moving_most_pages_builds_a_new_file_verified_and_recorded(tmp_path: Path) -> None:
    db, replica, staged, app, follower = _vacuum_batch(tmp_path, "id % 7 = 0")
    try:
        inode = os.stat(replica.path).st_ino
        _apply(replica, staged)
        assert replica.rewrites == 1, "a batch rewriting most pages must be applied as a new file"
        assert os.stat(replica.path).st_ino != inode, "the new file is renamed over the old one"
        assert replica.checksum == staged.checksum == follower.hashes.checksum
        assert file_checksum(replica.path, replica.page_size) == staged.checksum
        assert not list(replica.dir.glob("rewrite-*")), "no new file left behind"
        replica.close()
        again = Replica(replica.path)
        again.open()  # recovery reads the file and compares it with the recorded page hashes
        assert again.damage is None and again.checksum == staged.checksum
        assert again.position == replica.position
        with sqlite3.connect(replica.path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == ROWS - ROWS // 7
        again.close()
    finally:
        follower.close()
        app.close()


def test_small_or_scattered_batches_stay_journaled(tmp_path: Path) -> None:
    db, replica, staged, app, follower = _vacuum_batch(tmp_path, f"id > {ROWS - ROWS // 10}")
    try:
        _apply(replica, staged)  # a VACUUM after deleting the last tenth: nothing moves
        assert replica.rewrites == 0 and replica.checksum == follower.hashes.checksum
        # A tenth of the pages changed throughout, as one large transaction: scattered.
        app.execute("BEGIN")
        app.executemany("UPDATE t SET b = ? WHERE id = ?", ((b"\x01" * 3000, i) for i in range(1, ROWS, 10)))
        app.execute("COMMIT")
        for batch in iter(follower.poll, None):
            _apply(replica, _staged(batch))
        assert replica.rewrites == 0 and replica.checksum == follower.hashes.checksum
        assert file_checksum(replica.path, replica.page_size) == replica.checksum
    finally:
        replica.close()
        follower.close()
        app.close()


def test_a_rewrite_with_a_wrong_checksum_is_refused_leaving_the_old_file(tmp_path: Path) -> None:
    db, replica, staged, app, follower = _vacuum_batch(tmp_path, "id % 7 = 0")
    try:
        before, inode = replica.checksum, os.stat(replica.path).st_ino
        staged.checksum ^= 1
        with pytest.raises(BatchRejected):
            _apply(replica, staged)
        assert replica.checksum == before and os.stat(replica.path).st_ino == inode
        assert not list(replica.dir.glob("rewrite-*")) and replica.rewrites == 0
        assert file_checksum(replica.path, replica.page_size) == before
    finally:
        replica.close()
        follower.close()
        app.close()


def test_a_rewrite_over_the_journal_bound_stays_journaled_and_is_refused(tmp_path: Path) -> None:
    db, replica, staged, app, follower = _vacuum_batch(tmp_path, "id % 7 = 0")
    try:
        before = replica.checksum
        replica.budget = JournalBudget(2 * 1024 * 1024)  # smaller than a whole file and the batch's journal
        with pytest.raises(BatchRejected) as refused:
            _apply(replica, staged)
        assert refused.value.reason == "journal_limit"
        assert replica.rewrites == 0 and replica.checksum == before
        assert not list(replica.dir.glob("rewrite-*"))
    finally:
        replica.close()
        follower.close()
        app.close()


# -- SIGKILL at every step of the apply ---------------------------------------------

_WATCHED = (
    "write",
    "pwrite",
    "pwritev",
    "copy_file_range",
    "fsync",
    "fdatasync",
    "ftruncate",
    "replace",
    "unlink",
)


def _child(rep_path: str, work: Callable[[Replica], bool], kill_at: int, counted: Any) -> None:
    """Run ``work`` on the replica; SIGKILL this process at the ``kill_at``-th watched call (0: never)."""
    calls = [0]

    def watch(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            counted.value = calls[0]
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return call

    replica = Replica(Path(rep_path))
    replica.open()  # before watching: only the apply's own steps are counted
    for name in _WATCHED:
        setattr(os, name, watch(name, getattr(os, name)))
    os._exit(0 if work(replica) else 3)


def _rewrite(staged: Staged) -> Callable[[Replica], bool]:
    def work(replica: Replica) -> bool:
        _apply(replica, staged)
        return replica.rewrites == 1

    return work


def _run_child(rep: Path, work: Callable[[Replica], bool], kill_at: int) -> tuple[int, int]:
    ctx = mp.get_context("fork")  # fork: ``work`` may be a closure
    counted = ctx.Value("i", 0)
    proc = ctx.Process(target=_child, args=(str(rep), work, kill_at, counted))
    proc.start()
    proc.join(60)
    assert proc.exitcode is not None, "the replica process hung"
    return proc.exitcode, counted.value


def test_sigkill_at_every_step_of_a_rewrite_leaves_exactly_a_committed_state(tmp_path: Path) -> None:
    db, replica, staged, app, follower = _vacuum_batch(tmp_path, "id % 7 = 0")
    old_sum, old_pos = replica.checksum, replica.position
    new_sum = staged.checksum
    new_pos = Position.from_json(staged.header["position"])
    replica.close()
    follower.close()
    app.close()

    def leftovers(directory: Path) -> list[str]:
        return [
            p.name
            for p in directory.iterdir()
            if p.name.startswith("rewrite-") or p.name == "pagehashes.next"
        ]

    _kill_at_each_step(
        replica.path,
        _rewrite(staged),
        lambda steps: range(1, steps + 1),
        (old_sum, old_pos),
        (new_sum, new_pos),
        leftovers,
        min_steps=11,
    )


def _kill_at_each_step(
    rep: Path,
    work: Callable[[Replica], bool],
    kill_points: Callable[[int], Iterable[int]],
    old: tuple[int, Position | None],
    new: tuple[int, Position | None],
    leftovers: Callable[[Path], list[str]],
    *,
    min_steps: int,
) -> None:
    """Run ``work`` from the replica as it is now once whole (counting its ``steps``: at least
    ``min_steps``), then SIGKILLed at each of ``kill_points(steps)`` in turn.

    Every recovery must be exactly ``old`` or ``new`` (checksum and position), undamaged, its file
    matching, nothing ``leftovers`` names left behind; the old state first, the new one last, one
    switch between them.
    """
    replica_dir = Path(str(rep) + ".hotsite")
    pristine = rep.parent / "pristine"
    pristine.mkdir()
    shutil.copy2(rep, pristine / "rep.db")
    shutil.copytree(replica_dir, pristine / "rep.db.hotsite")
    code, steps = _run_child(rep, work, 0)
    assert code == 0, "the work must complete (and as intended) when not killed"
    assert steps >= min_steps
    states: dict[tuple[int, Position | None], str] = {old: "old", new: "new"}
    outcomes: list[str] = []
    for kill_at in kill_points(steps):
        shutil.rmtree(replica_dir)
        shutil.copy2(pristine / "rep.db", rep)
        shutil.copytree(pristine / "rep.db.hotsite", replica_dir)
        code, _ = _run_child(rep, work, kill_at)
        assert code == -signal.SIGKILL, f"step {kill_at}: expected the process killed, exit {code}"
        after = Replica(rep)
        after.open()
        try:
            state = states.get((after.checksum, after.position))
            assert state is not None, (
                f"killed at step {kill_at} of {steps}: recovered checksum {show(after.checksum)} at"
                f" {after.position} is neither the state before ({show(old[0])}) nor after ({show(new[0])})"
            )
            assert after.damage is None, f"step {kill_at} of {steps}: {after.damage}"
            assert file_checksum(after.path, after.page_size) == after.checksum
            assert not leftovers(after.dir), f"step {kill_at}: left behind: {leftovers(after.dir)}"
            outcomes.append(state)
        finally:
            after.close()
    # Killed early: the old state; from the completed journal on: the new one; never back again.
    assert outcomes[0] == "old" and outcomes[-1] == "new"
    flips = sum(1 for a, b in zip(outcomes, outcomes[1:], strict=False) if a != b)
    assert flips == 1, f"states by kill step: {outcomes}"


def _reseed(image: bytes, page_size: int, position: Position) -> Callable[[Replica], bool]:
    def work(replica: Replica) -> bool:
        pages = [(i // page_size + 1, image[i : i + page_size]) for i in range(0, len(image), page_size)]
        replica.seed_begin(page_size, len(pages))
        replica.seed_pages(pages)
        replica.seed_end(position, image_checksum(image, page_size), 1.0)
        return True

    return work


def test_sigkill_at_every_step_of_a_reseed_leaves_exactly_a_committed_state(tmp_path: Path) -> None:
    """A resnapshot over a good replica, killed anywhere, leaves the good replica or the new one.

    Before, a kill between the seed's journal and its rename left "damage" (recovery first
    dropped the seed file the complete journal named), and a kill after a later seed had
    begun could have put that seed's half-written file in place.
    """
    db = tmp_path / "src.db"
    app = _app(db)
    follower, replica = _seeded(db, tmp_path / "rep.db")
    old_sum, old_pos = replica.checksum, replica.position
    assert old_pos is not None
    app.execute("DELETE FROM t WHERE id % 3 = 0")
    app.execute("VACUUM")
    app.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    image, size = db.read_bytes(), replica.page_size
    new_sum, new_pos = image_checksum(image, size), Position(old_pos.generation, old_pos.frame + 1)
    replica.close()
    follower.close()
    app.close()

    def kill_points(steps: int) -> list[int]:
        # Every step but the run of page writes (one in 64 of those): each kill is a fork and a copy.
        return sorted({*range(1, steps + 1, 64), *range(1, 4), *range(max(1, steps - 40), steps + 1)})

    _kill_at_each_step(
        replica.path,
        _reseed(image, size, new_pos),
        kill_points,
        (old_sum, old_pos),
        (new_sum, new_pos),
        lambda directory: [p.name for p in directory.iterdir() if "seed" in p.name],
        min_steps=6,
    )
