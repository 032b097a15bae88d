"""No silent stops: a stream task that fails is restarted with backoff, logged at ERROR with its
cause, counted, shown in status, and its error cleared once it runs a session again.

Real source agent over real TLS; the failure is a RuntimeError injected where the client's
own retry loop cannot catch it (``run`` itself), the kind that used to kill the task for good.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from appliance.replication.client import SqliteStreamClient
from appliance.replication.metrics import ReplicationMetrics
from appliance.replication.replica import logical_checksum
from appliance.replication.service import ReplicationService
from tests.support import replication_rig


async def _until(cond: object, timeout: float, what: str) -> None:
    start = time.monotonic()
    while not cond():  # type: ignore[operator]
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.05)


def test_a_failing_stream_task_is_restarted_logged_counted_and_shown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = tmp_path / "tls"
    replication_rig.pki(certs)
    db = tmp_path / "customers.db"
    app = sqlite3.connect(db, isolation_level=None)
    app.execute("PRAGMA journal_mode=WAL")
    app.execute("CREATE TABLE c (id INTEGER PRIMARY KEY, name TEXT)")
    app.execute("INSERT INTO c (name) VALUES ('a')")

    async def scenario() -> None:
        agent = replication_rig.sqlite_agent(db, certs, stream="customers", heartbeat_s=0.1)
        await agent.start()
        section = replication_rig.section(
            agent.port,
            certs,
            {
                "streams": {
                    "customers": {"kind": "sqlite", "source": "customers", "replica": str(tmp_path / "r.db")}
                },
            },
        )
        original = SqliteStreamClient.run
        failures = [RuntimeError("bug in a session"), RuntimeError("bug in a session")]

        async def flaky(self: SqliteStreamClient) -> None:  # escapes the client's own retry loop
            if failures:
                raise failures.pop()
            await original(self)

        monkeypatch.setattr(SqliteStreamClient, "run", flaky)
        registry = CollectorRegistry()
        service = ReplicationService(section, metrics=ReplicationMetrics(registry))
        s = service.streams["customers"]
        try:
            await service.start()
            assert s.client is not None
            await _until(lambda: s.task_failures == 2, 20, "two failures seen")
            status = service.status()[0]
            assert status["task_failures"] == 2 and "RuntimeError: bug in a session" in status["task_error"]
            assert s.task is not None and not s.task.done(), "the supervisor let the task die"
            await service.tick()
            assert (
                registry.get_sample_value("hotsite_replication_task_failures_total", {"stream": "customers"})
                == 2
            )
            app.execute("INSERT INTO c (name) VALUES ('b')")
            r = s.replica
            assert r is not None
            await _until(lambda: r.checksum == logical_checksum(db), 30, "replicating again")
            await _until(lambda: service.status()[0]["task_error"] == "", 10, "the old error cleared")
        finally:
            await service.stop()
            await agent.stop()

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    app.close()
    failed = [r for r in caplog.records if r.getMessage() == "replication stream failed; restarting"]
    assert len(failed) == 2 and all(r.levelno == logging.ERROR for r in failed)
    assert failed[0].exc_info is not None, "the cause (traceback) is logged"
