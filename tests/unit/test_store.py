"""The state store: migrations, the append-only audit log, the single-owner lock, crash safety."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import store as store_mod
from appliance.clock import SimulatedClock
from appliance.errors import StateError
from appliance.migrations import CORE
from appliance.store import Store


def test_fresh_database_is_migrated_and_in_wal_mode(tmp_path: Path) -> None:
    s = Store.open(tmp_path)
    assert s.schema_version() == len(CORE)
    s.close()
    conn = sqlite3.connect(tmp_path / store_mod.DB_NAME)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_record_and_query_events(tmp_path: Path) -> None:
    clock = SimulatedClock()
    s = Store.open(tmp_path, clock=clock.time)
    first = s.record("probe.state", subject="trunk:a", message="up", data={"code": 200})
    clock.advance(10)
    s.record("operator.note", actor="uid=0(root)", message="replaced fan")
    clock.advance(10)
    s.record("probe.state.extra", message="prefix match")
    assert [e.kind for e in s.events()] == ["probe.state.extra", "operator.note", "probe.state"]
    assert [e.id for e in s.events(kind="probe.state")] == [3, 1]
    assert [e.message for e in s.events(since=first.at + 5)] == ["prefix match", "replaced fan"]
    assert s.events(limit=1)[0].id == 3
    assert s.events(kind="operator")[0].actor == "uid=0(root)"
    assert s.events(kind="probe.state")[-1].data == {"code": 200}
    s.close()


def test_audit_log_is_append_only(tmp_path: Path) -> None:
    s = Store.open(tmp_path)
    s.record("daemon.start")
    s.close()
    conn = sqlite3.connect(tmp_path / store_mod.DB_NAME)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE events SET message = 'rewritten'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM events")


def test_keyed_state_survives_reopen(tmp_path: Path) -> None:
    s = Store.open(tmp_path)
    assert s.get_state("failover", "none") == "none"
    s.put_state("failover", {"state": "primary_active", "epoch": 3})
    s.put_state("failover", {"state": "backup_active", "epoch": 4})
    s.close()
    s = Store.open(tmp_path)
    assert s.get_state("failover") == {"state": "backup_active", "epoch": 4}
    s.close()


def test_second_owner_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    s = Store.open(tmp_path)
    with pytest.raises(StateError, match=r"another hotsite daemon \(pid \d+\) is already using"):
        Store.open(tmp_path)
    s.close()
    Store.open(tmp_path).close()  # free again once the first owner closed


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    Store.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / store_mod.DB_NAME)
    with conn:
        conn.execute("UPDATE schema_versions SET version = 99 WHERE component = 'core'")
    conn.close()
    with pytest.raises(StateError, match="core schema version 99, newer than this hotsite"):
        Store.open(tmp_path)


def test_garbage_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / store_mod.DB_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(StateError, match="is unusable"):
        Store.open(tmp_path)


CRASHER = """
import os, sys
from pathlib import Path
from appliance.store import Store
s = Store.open(Path(sys.argv[1]))
n = 0
while True:
    s.record("load", message=str(n), data={"n": n})
    n += 1
    if n == int(sys.argv[2]):
        os.kill(os.getpid(), 9)
"""


@pytest.mark.parametrize("kill_after", [1, 57, 400])
def test_sigkill_mid_write_leaves_a_consistent_database(tmp_path: Path, kill_after: int) -> None:
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(tmp_path), str(kill_after)], check=False)
    assert proc.returncode == -9
    s = Store.open(tmp_path)
    events = s.events(limit=10_000)
    # Every acknowledged record is there, numbered without gaps, each complete.
    assert len(events) == kill_after
    assert [e.data["n"] for e in reversed(events)] == list(range(kill_after))
    conn = sqlite3.connect(tmp_path / store_mod.DB_NAME)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    s.close()


def test_components_migrate_independently_and_only_once(tmp_path: Path) -> None:
    components = {"core": CORE, "testcomp": ["CREATE TABLE outbox (id INTEGER PRIMARY KEY);"]}
    s = Store.open(tmp_path, components=components)
    assert s.schema_version("testcomp") == 1
    with s.transaction() as conn:
        conn.execute("INSERT INTO outbox (id) VALUES (7)")
    s.close()
    grown = {**components, "testcomp": [*components["testcomp"], "ALTER TABLE outbox ADD COLUMN body TEXT;"]}
    s = Store.open(tmp_path, components=grown)
    assert s.schema_version("testcomp") == 2 and s.schema_version("core") == len(CORE)
    assert [tuple(r) for r in s.query("SELECT id, body FROM outbox")] == [(7, None)]
    s.close()


def test_a_failed_migration_leaves_the_previous_version(tmp_path: Path) -> None:
    broken = {"core": CORE, "testcomp": ["CREATE TABLE a (x); CREATE TABLE a (x);"]}
    with pytest.raises(StateError, match="table a already exists"):
        Store.open(tmp_path, components=broken)
    s = Store.open(tmp_path)
    assert s.schema_version("testcomp") == 0
    assert not s.query("SELECT name FROM sqlite_master WHERE name = 'a'")
    s.close()
