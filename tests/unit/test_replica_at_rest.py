"""The replica at rest: verified against its recorded page hashes, promotion and demotion guards,
snapshots of verified states only, a failing disk. Real SQLite files, real journals, real threads."""

from __future__ import annotations

import errno
import os
import random
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from appliance.replication.checksum import PageHashes, page_hash
from appliance.replication.position import Batch, Generation, Position
from appliance.replication.record import HashRecord
from appliance.replication.replica import PromotedError, Replica, ReplicaStorageError, image_checksum
from appliance.replication.snapshots import RestoreError, SnapshotStore

GEN = Generation(7, 9)


def _source(tmp_path: Path, rows: int = 300) -> Path:
    db = tmp_path / "source.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE c (id INTEGER PRIMARY KEY, name TEXT)")
    conn.executemany("INSERT INTO c (name) VALUES (?)", [(f"customer {i:05d} " * 6,) for i in range(rows)])
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return db


def _pages(image: bytes, size: int = 4096) -> dict[int, bytes]:
    return {i // size + 1: image[i : i + size] for i in range(0, len(image), size)}


def _seeded(tmp_path: Path, image: bytes, *, durable: bool = True) -> Replica:
    r = Replica(tmp_path / "rep" / "c.db", durable=durable)
    r.open()
    pages = _pages(image)
    r.seed_begin(4096, len(pages))
    r.seed_pages(sorted(pages.items()))
    r.seed_end(Position(GEN, 0), image_checksum(image, 4096), time.time())
    return r


def _resync(r: Replica, image: bytes, frame: int) -> Batch:
    """What the source sends a replica that asks for a resync: the pages that differ from its hashes."""
    pages = {p: d for p, d in _pages(image).items() if r.hashes.hashes.get(p, 0) != page_hash(p, d)}
    n = len(image) // 4096
    return Batch(
        "resync",
        None,
        Position(GEN, frame),
        4096,
        n,
        n,
        image_checksum(image, 4096),
        time.time(),
        pages=pages,
    )


def _tx(r: Replica, image: bytes, frame: int) -> tuple[Batch, bytes]:
    """A transaction that rewrites page 2 with new bytes (and the image it leads to)."""
    new = bytearray(image)
    new[4096 + 100 : 4096 + 116] = os.urandom(16)
    after = bytes(new)
    n = len(after) // 4096
    b = Batch(
        "tx",
        r.position,
        Position(GEN, frame),
        4096,
        n,
        n,
        image_checksum(after, 4096),
        time.time(),
        pages={2: after[4096:8192]},
    )
    return b, after


@pytest.mark.parametrize("damage", ["row", "flip", "older", "deleted", "wal"])
def test_each_damage_at_rest_is_found_at_open_and_repaired_by_a_resync(tmp_path: Path, damage: str) -> None:
    image = _source(tmp_path).read_bytes()
    r = _seeded(tmp_path, image)
    older = tmp_path / "older.db"
    shutil.copyfile(r.path, older)
    b, image = _tx(r, image, 5)
    r.apply(b)
    r.close()
    if damage == "row":
        w = sqlite3.connect(r.path, isolation_level=None)
        w.execute("UPDATE c SET name = 'edited' WHERE id = 250")
        w.close()
    elif damage == "flip":
        data = bytearray(r.path.read_bytes())
        data[5 * 4096 + 7 : 5 * 4096 + 23] = bytes(x ^ 0x5A for x in data[5 * 4096 + 7 : 5 * 4096 + 23])
        r.path.write_bytes(bytes(data))
    elif damage == "older":
        shutil.copyfile(older, r.path)
    elif damage == "deleted":
        r.path.unlink()
    else:
        Path(str(r.path) + "-wal").write_bytes(b"x" * 4128)
    again = Replica(r.path)
    again.open()
    assert again.damage is not None and not again.verified and again.needs_resync
    expected = {"row": "pages differ", "flip": "1 of", "older": "page 2", "deleted": "missing", "wal": "-wal"}
    assert expected[damage] in again.damage, again.damage
    with pytest.raises(PromotedError, match="refusing to promote"):
        again.promote(None, "test")
    assert again.promotion is None
    if damage == "wal":
        Path(str(r.path) + "-wal").unlink()
    # The source, reachable again, sends exactly the pages that differ; the damage is gone for good.
    fix = _resync(again, image, 9)
    if damage == "flip":
        assert sorted(fix.pages) == [6]
    again.apply(fix)
    assert again.damage is None and again.verified and again.checksum == image_checksum(image, 4096)
    again.close()
    third = Replica(r.path)
    third.open()
    assert third.damage is None and third.verified and third.position == Position(GEN, 9)
    third.close()


def test_a_crash_between_the_file_and_the_record_is_redone_not_reported(tmp_path: Path) -> None:
    image = _source(tmp_path).read_bytes()
    r = _seeded(tmp_path, image)
    b, after = _tx(r, image, 5)
    # The journal is complete, the database and the record were never touched: a crash there.
    r._write_journal({**b.header(), "applied_at": 1.0, "promoted": None}, sorted(b.pages.items()))
    r.close()
    again = Replica(r.path)
    again.open()
    assert again.damage is None and again.position == b.position
    assert again.checksum == image_checksum(after, 4096) == HashRecord(again.dir).load().checksum  # type: ignore[union-attr]
    again.close()


def test_a_record_from_an_older_version_is_rebuilt_only_from_a_matching_file(tmp_path: Path) -> None:
    image = _source(tmp_path).read_bytes()
    r = _seeded(tmp_path, image)
    b, _after = _tx(r, image, 5)
    r.apply(b)
    r.close()
    (r.dir / "pagehashes").unlink()
    again = Replica(r.path)
    again.open()
    assert again.damage is None and (r.dir / "pagehashes").exists()
    again.close()
    (r.dir / "pagehashes").unlink()
    data = bytearray(r.path.read_bytes())
    data[3 * 4096 + 9] ^= 1
    r.path.write_bytes(bytes(data))
    third = Replica(r.path)
    third.open()
    assert third.damage is not None and "cannot be verified" in third.damage
    third.close()


def test_never_seeded_cannot_be_promoted(tmp_path: Path) -> None:
    r = Replica(tmp_path / "empty.db")
    r.open()
    with pytest.raises(PromotedError, match="never seeded"):
        r.promote(None, "test", force_damaged=True)
    r.close()


def test_forced_promotion_of_a_damaged_copy_records_the_damage(tmp_path: Path) -> None:
    image = _source(tmp_path).read_bytes()
    r = _seeded(tmp_path, image)
    r.close()
    data = bytearray(r.path.read_bytes())
    data[4 * 4096 + 1] ^= 0xFF
    r.path.write_bytes(bytes(data))
    again = Replica(r.path)
    again.open()
    p = again.promote(None, "dr", force_damaged=True)
    assert p.damaged and "1 of" in p.damaged and p.to_json()["damaged"] == p.damaged
    again.close()


def test_snapshots_only_of_verified_states_never_leave_a_tmp(tmp_path: Path) -> None:
    image = _source(tmp_path).read_bytes()
    r = _seeded(tmp_path, image)
    store = SnapshotStore(tmp_path / "snaps", keep=3)
    snap = store.take(r, now=100.0)
    assert snap is not None and snap.checksum == r.checksum
    # A crash (kill) mid-copy leaves a temporary file: the next store removes it.
    (tmp_path / "snaps" / ".200.000.tmp").write_bytes(b"half")
    store = SnapshotStore(tmp_path / "snaps", keep=3)
    assert not list((tmp_path / "snaps").glob("*.tmp")) and not list((tmp_path / "snaps").glob(".*.tmp"))
    # The file changed outside replication: no snapshot, the damage is noticed, nothing left behind.
    with open(r.path, "r+b") as f:
        f.seek(4096 * 3 + 5)
        f.write(b"\x01\x02\x03")
    with pytest.raises(Exception, match="changed outside replication"):
        store.take(r, now=300.0)
    assert r.damage and not r.verified and store.take(r, now=301.0) is None
    assert [s.taken_at for s in store.list()] == [100.0]
    assert not list((tmp_path / "snaps").glob(".*.tmp"))
    # Restore verifies what it writes: a snapshot damaged in its directory is refused.
    out = tmp_path / "restored.db"
    assert (
        store.restore(150.0, out).taken_at == 100.0
        and image_checksum(out.read_bytes(), 4096) == snap.checksum
    )
    with open(snap.path, "r+b") as f:
        f.seek(4096 + 17)
        f.write(b"\xff")
    with pytest.raises(RestoreError, match="damaged"):
        store.restore(150.0, tmp_path / "again.db")
    assert not (tmp_path / "again.db").exists() and not list(tmp_path.glob(".again.db.tmp"))
    r.close()


def test_a_full_disk_is_a_storage_error_and_the_next_session_redoes_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = _source(tmp_path).read_bytes()
    r = _seeded(tmp_path, image)
    b, after = _tx(r, image, 5)
    real = os.pwrite

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(ReplicaStorageError, match="filesystem is full") as info:
        r.apply(b)
    assert info.value.disk_full
    monkeypatch.setattr(os, "pwrite", real)
    r.ensure_recovered()
    assert r.position == b.position and r.damage is None and r.checksum == image_checksum(after, 4096)
    r.close()


def _demote_race(tmp_path: Path, rng: random.Random, image: bytes) -> tuple[int, str]:
    """One run: promote, a writer at the backup, demote at a random moment, then the resync.

    Returns (overwritten writes, outcome).
    """
    if (tmp_path / "rep").exists():
        shutil.rmtree(tmp_path / "rep")
    r = _seeded(tmp_path, image, durable=False)
    r.promote(0.0, "drill")
    committed: list[int] = []
    plan = rng.choice(["none", "before", "during", "after", "stream"])
    start = threading.Event()

    def writer() -> None:
        w = sqlite3.connect(r.path, isolation_level=None, timeout=10)
        start.wait()
        try:
            if plan == "before":
                w.execute("INSERT INTO c (name) VALUES ('backup write')")
                committed.append(w.execute("SELECT last_insert_rowid()").fetchone()[0])
            elif plan != "none":
                time.sleep(rng.uniform(0, 0.004) if plan == "during" else rng.uniform(0.004, 0.02))
                for _ in range(rng.randint(1, 5) if plan == "stream" else 1):
                    w.execute("INSERT INTO c (name) VALUES ('backup write')")
                    committed.append(w.execute("SELECT last_insert_rowid()").fetchone()[0])
                    time.sleep(rng.uniform(0, 0.002))
        except sqlite3.OperationalError:
            pass  # locked out by the demotion's check: not committed, nothing to lose
        finally:
            w.close()

    t = threading.Thread(target=writer)
    t.start()
    start.set()
    if plan == "before":
        time.sleep(0.005)
    else:
        time.sleep(rng.uniform(0, 0.004))
    outcome = "demoted"
    try:
        r.demote()
    except PromotedError:
        outcome = "refused"
    t.join()
    if outcome == "demoted":
        try:
            r.apply(_resync(r, image, 20))  # the source's resync after the demotion
        except PromotedError:
            outcome = "held"  # writes found after the demotion: apply stopped
    r.close()
    reader = sqlite3.connect(r.path)
    present = {row[0] for row in reader.execute("SELECT id FROM c")}
    state = image_checksum(reader.serialize(), 4096)
    reader.close()
    if outcome == "demoted":
        # Replication took over the file: it must be exactly the source's state, and every write
        # the backup committed was overwritten (or worse, mixed into what claims to be a replica).
        assert state == image_checksum(image, 4096) or committed, "replica is not the source state"
        return len(committed), outcome
    return len([i for i in committed if i not in present]), outcome


def test_demote_never_overwrites_a_write_made_at_the_backup_randomised(tmp_path: Path) -> None:
    image = _source(tmp_path, rows=50).read_bytes()
    outcomes: dict[str, int] = {}
    overwritten = 0
    for run in range(100):
        lost, outcome = _demote_race(tmp_path, random.Random(run), image)
        overwritten += lost
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(f"demote race: 100 runs, outcomes {outcomes}, overwritten writes {overwritten}")
    assert overwritten == 0
    assert outcomes.get("demoted", 0) and outcomes.get("refused", 0)  # both paths were exercised


def test_demote_with_discard_saves_the_backups_copy_first(tmp_path: Path) -> None:
    image = _source(tmp_path).read_bytes()
    r = _seeded(tmp_path, image)
    r.promote(0.0, "drill")
    w = sqlite3.connect(r.path, isolation_level=None)
    w.execute("INSERT INTO c (name) VALUES ('only at the backup')")
    w.close()
    with pytest.raises(PromotedError, match="--discard-local-writes") as refused:
        r.demote()
    assert "restore --from-replica" not in refused.value.message
    store = SnapshotStore(r.dir / "snapshots")
    kept = r.demote(discard_local_writes=True, keep=lambda img: store.save(img, "backup-writes"))
    assert kept is not None and kept.exists()
    saved = sqlite3.connect(kept).execute("SELECT count(*) FROM c WHERE name = 'only at the backup'")
    assert saved.fetchone()[0] == 1
    assert r.damage is not None and r.needs_resync and not r.verified
    assert store.take(r) is None  # not a committed state until the resync
    r.apply(_resync(r, image, 3))
    assert r.verified and r.checksum == image_checksum(image, 4096)
    r.close()


@pytest.mark.parametrize("torn_at", ["pages", "record"])
def test_a_crash_during_a_second_seed_keeps_the_first_seeds_replica(tmp_path: Path, torn_at: str) -> None:
    """A resnapshot killed before its journal leaves the replica at the last committed state.

    Both leftovers of the torn seed (its half-written file and, if it got that far, its staged
    page-hash record) must be dropped: recovery used to rename any leftover seed file over a
    good replica because the newest complete journal was also a seed.
    """
    first = _source(tmp_path).read_bytes()
    r = _seeded(tmp_path, first)
    good = r.checksum
    second = bytearray(first)
    second[4096 * 3 + 100 : 4096 * 3 + 116] = b"\xff" * 16  # any other database will do
    pages = _pages(bytes(second))
    r.seed_begin(4096, len(pages))
    r.seed_pages(sorted(pages.items())[: len(pages) // 2])
    if torn_at == "record":  # seed_end got as far as staging its record, not its journal
        staged = PageHashes()
        staged.db_pages = len(pages)
        for pgno, data in pages.items():
            staged.set(pgno, data)
        HashRecord(r.dir).write_whole(staged, 4096, r.seq + 1, staged=True)
    r.close()  # the process dies here: its files stay as they are (close removes none)
    again = Replica(r.path)
    again.open()
    assert again.damage is None, again.damage
    assert again.checksum == good
    assert (tmp_path / "rep" / "c.db").read_bytes() == first
    assert not [p.name for p in again.dir.iterdir() if "seed" in p.name]
