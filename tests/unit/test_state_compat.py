"""A state directory written before the layers change is read after it, without a migration.

``tests/fixtures/state-535440a/`` was written by the store and engine code of
commit 535440a (the last before the settings moved into the features), as its
daemon writes them: every component's schema, the audit records of a start,
an operator note, a probe change and a stop, and the engine's saved state
(``tests/fixtures/make_state_535440a.py``). Today's store must open it as it
is (no migration to apply: no schema changed), read the audit log, and the
engine state must load and round-trip unchanged.
tests/integration/test_state_compat.py starts the real daemon on a copy.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from appliance import migrations
from appliance.store import DB_NAME, Store
from failover.engine import EngineState
from failover.service import STATE_KEY
from tests.conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "state-535440a"
NOTE = "written by the daemon before the layers change"


def _versions(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT component, version FROM schema_versions").fetchall())


def test_the_old_state_needs_no_migration(tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(FIXTURE, state)
    before = _versions(state / DB_NAME)
    assert before == {name: len(steps) for name, steps in migrations.COMPONENTS.items()}
    Store.open(state, components=migrations.COMPONENTS).close()  # as the daemon opens it
    assert _versions(state / DB_NAME) == before


def test_the_old_audit_log_and_engine_state_are_read(tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(FIXTURE, state)
    store = Store.open(state, components=migrations.COMPONENTS)
    try:
        events = store.events(limit=1000)
        saved = store.get_state(STATE_KEY)
    finally:
        store.close()
    kinds = {event.kind for event in events}
    assert {"daemon.start", "daemon.stop"} <= kinds
    assert [e.message for e in events if e.kind == "operator.note"] == [NOTE]
    engine = EngineState.from_json(saved)
    loaded = engine.to_json()
    assert {k: loaded[k] for k in saved} == saved  # every field of the old record is understood and kept
    # Fields added since take their defaults: an old state owes no verification calls.
    assert set(loaded) - set(saved) == {"verifying", "primary_why"} and engine.verifying is None
