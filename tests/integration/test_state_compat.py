"""The real daemon of today starts on a state directory written by the code before the layers change.

See tests/unit/test_state_compat.py for how ``tests/fixtures/state-535440a``
was made. Here the daemon itself runs on a copy: it starts, keeps the old
audit log (the old note is listed by ``hotsite events``), resumes the saved
engine state (same routing and epoch), and appends to the same log.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
from pathlib import Path

from appliance.store import DB_NAME
from failover.service import STATE_KEY
from tests.conftest import free_port
from tests.integration.daemon_helpers import RunningDaemon, hotsite
from tests.support import configs
from tests.unit.test_state_compat import FIXTURE, NOTE


def _saved_engine_state() -> str:
    with sqlite3.connect(FIXTURE / DB_NAME) as conn:
        (value,) = conn.execute("SELECT value FROM state WHERE key = ?", (STATE_KEY,)).fetchone()
    return str(value)


def test_the_daemon_runs_on_a_state_directory_from_before(tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(FIXTURE, state)
    cfg = tmp_path / "hotsite.toml"
    cfg.write_text(
        configs.DAEMON.format(
            state=state, run=tmp_path / "run", metrics_port=free_port(), sbc_port=free_port(socket.SOCK_DGRAM)
        )
    )
    daemon = RunningDaemon(cfg, tmp_path / "daemon.log")
    try:
        daemon.wait_ready(30)
        failover = daemon.status()["failover"]
        events = json.loads(hotsite("events", "--json", "--limit", "500", config=cfg).stdout)
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log.read_text()
    assert [e["message"] for e in events if e["kind"] == "operator.note"] == [NOTE]
    starts = [e for e in events if e["kind"] == "daemon.start"]
    assert (
        len(starts) == 2 and starts[0]["data"]["pid"] == daemon.proc.pid
    )  # newest first: ours, then the old
    saved = json.loads(_saved_engine_state())
    assert (failover["routing"], failover["epoch"]) == (saved["routing"], saved["epoch"])
    assert "Traceback" not in daemon.log.read_text()
