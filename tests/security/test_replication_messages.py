"""Messages a compromised primary crafts to kill a replication task: each is counted, logged, shown
in ``replication status``, the session restarts and the stream lives on.

Over real mutual TLS, against the real :class:`ReplicationService` (files) and
:class:`SqliteStreamClient` (SQLite).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from appliance.config import ReplicationSection
from appliance.replication import protocol
from appliance.replication.client import SqliteStreamClient
from appliance.replication.metrics import ReplicationMetrics
from appliance.replication.protocol import Msg
from appliance.replication.replica import Replica
from appliance.replication.service import ReplicationService
from tests.security.replication_support import (
    HostileAgent,
    cancel,
    manifest,
    nested_header,
    raw_message,
    until,
)
from tests.support import replication_rig
from tests.support.replication_rig import client_ctx, pki


def _section(certs: Path, port: int, root: Path) -> ReplicationSection:
    return replication_rig.section(
        port,
        certs,
        {
            "streams": {"dialplans": {"kind": "files", "source": "dialplans", "replica": str(root)}},
        },
    )


def test_huge_mode_and_nested_header_restart_the_files_session(tmp_path: Path) -> None:
    certs = pki(tmp_path / "tls")
    root = tmp_path / "replica" / "dialplans"

    async def scenario() -> None:
        agent = HostileAgent(certs)
        agent.script = manifest({"a.conf": (b"a\n", 2**40)})
        await agent.start()
        registry = CollectorRegistry()
        service = ReplicationService(_section(certs, agent.port, root), metrics=ReplicationMetrics(registry))
        await service.start()
        stream = service.streams["dialplans"]
        assert stream.task is not None

        def status() -> dict[str, object]:
            return service.status()[0]

        try:
            # A mode of 2**40: refused by the schema; the session restarts (and is refused again).
            # While a session is connected, status shows no error: wait for one that was refused
            # after the restart (the session count alone races the reconnect).
            await until(
                lambda: (agent.sessions >= 2 and "mode" in str(status()["last_error"])) or stream.task.done(),  # type: ignore[union-attr]
                what="a second session refused for its mode",
            )
            assert not stream.task.done(), "the files task died"
            # A header nested 100,000 deep: refused before it reaches the parser's recursion.
            agent.script = [raw_message(Msg.FILES_MANIFEST, nested_header())]
            await until(lambda: "deeper" in str(status()["last_error"]) or stream.task.done(), what="refusal")  # type: ignore[union-attr]
            assert not stream.task.done(), "the files task died"
            last_error_at = status()["last_error_at"]
            assert isinstance(last_error_at, float) and abs(last_error_at - time.time()) < 60
            # The stream is alive: an ordinary change set is applied.
            agent.script = manifest({"good.conf": (b"good\n", 0o644)})
            await until(lambda: (root / "good.conf").exists(), what="the next change set")
            await service.tick()
            malformed = registry.get_sample_value(
                "hotsite_replication_malformed_messages_total", {"stream": "dialplans"}
            )
            assert malformed is not None and malformed >= 2
            assert status()["malformed_messages"] == malformed
        finally:
            await service.stop()
            await agent.stop()

    asyncio.run(scenario())


def test_nested_header_restarts_the_sqlite_session(tmp_path: Path) -> None:
    certs = pki(tmp_path / "tls")

    async def scenario() -> None:
        agent = HostileAgent(certs, welcome={"mode": "seed"})
        agent.script = [
            raw_message(Msg.SEED_BEGIN, b'{"page_size":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        ]
        await agent.start()
        replica = Replica(tmp_path / "replica" / "customers.db")
        replica.open()
        client = SqliteStreamClient(
            "customers",
            "customers",
            replica,
            host="127.0.0.1",
            port=agent.port,
            server_name="source",
            ssl_context=client_ctx(certs),
        )
        task = asyncio.create_task(client.run())
        try:
            # While a session is connected, last_error is empty (only the current error is shown):
            # wait for one refused after the restarts (the session count alone races the reconnect).
            await until(
                lambda: (agent.sessions >= 3 and "deeper" in client.stats.last_error) or task.done(),
                what="a third session refused for its nesting",
            )
            assert not task.done(), "the SQLite task died"
            assert client.stats.malformed_messages >= 2
            # A header field of the wrong type (a string for the page size) is malformed too.
            agent.script = [protocol.encode(Msg.SEED_BEGIN, {"page_size": "4096", "db_pages": {}})]
            seen = agent.sessions
            await until(
                lambda: (
                    (agent.sessions >= seen + 2 and "invalid header field" in client.stats.last_error)
                    or task.done()
                ),
                what="two more sessions, refused for a header field",
            )
            assert not task.done(), "the SQLite task died"
        finally:
            await cancel(task)
            await agent.stop()
            replica.close()

    asyncio.run(scenario())
