"""``hotsite source --check`` refuses what the agent cannot follow; ``replication verify`` reports
progress while it runs and has no fixed limit of its own but ``--timeout``."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from appliance.cli import replication as cli_replication
from appliance.cli.main import cli
from appliance.replication.certs import issue, make_ca


def _config(tmp_path: Path, db: Path) -> Path:
    certs = tmp_path / "tls"
    make_ca(certs)
    issue(certs, "source", hosts=["127.0.0.1"], server=True)
    cfg = tmp_path / "source.toml"
    cfg.write_text(
        f'[source]\ntls_cert_file = "{certs / "source.pem"}"\ntls_key_file = "{certs / "source.key"}"\n'
        f'tls_ca_file = "{certs / "ca.pem"}"\n[streams.customers]\nkind = "sqlite"\npath = "{db}"\n'
    )
    return cfg


@pytest.mark.parametrize("mode", ["delete", "truncate", "wal"])
def test_source_check_refuses_a_database_not_in_wal_mode(tmp_path: Path, mode: str) -> None:
    db = tmp_path / "customers.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute("CREATE TABLE c (x)")
    conn.close()
    result = CliRunner().invoke(cli, ["source", "--check", "-c", str(_config(tmp_path, db))])
    if mode == "wal":
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 2, result.output
        assert "streams.customers.path" in result.output and "not in WAL mode" in result.output
        assert "PRAGMA journal_mode=WAL" in result.output


def test_source_check_refuses_a_file_that_is_not_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "customers.db"
    db.write_text("name,phone\n")
    result = CliRunner().invoke(cli, ["source", "--check", "-c", str(_config(tmp_path, db))])
    assert result.exit_code == 2 and "is not a SQLite database" in result.output


def test_verify_prints_progress_and_waits_past_the_socket_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    answers: list[Any] = [
        {"pending": True, "progress": {"phase": "waiting for the replica to reach g/10"}},
        {"pending": True, "progress": {"phase": "hashing the replica file", "hashed_pages": [500, 1000]}},
        {"ok": True, "position": "g/10", "source_checksum": "ab", "replica_checksum": "ab"},
    ]
    calls: list[dict[str, Any]] = []

    def fake_call(method: str, **params: Any) -> Any:
        calls.append({"method": method, **params})
        return answers.pop(0)

    monkeypatch.setattr(cli_replication, "_call", fake_call)
    result = CliRunner().invoke(cli_replication.replication, ["verify", "customers"])
    assert result.exit_code == 0, result.output
    assert "hashing the replica file (500/1000 pages, 50%)" in result.output and "match" in result.output
    assert all(c["wait_s"] <= 5 for c in calls) and len(calls) == 3
