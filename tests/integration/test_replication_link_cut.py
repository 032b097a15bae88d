"""A connection cut mid-stream does not cost a resnapshot: the agent's follower stands.

Issue 15 (last loose end): a session that ended on a connection error (the agent's send failing
as the path was reset while it sent a large transaction) closed its follower instead of keeping
it standing. The WAL then restarted unguarded (here: the application's TRUNCATE checkpoint while
the backup was away), the next session could not account for the replica's position and resynced
by hashes, counted as a resnapshot, after reading the whole source database again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path

from appliance.replication.client import SqliteStreamClient
from appliance.replication.replica import Replica, logical_checksum
from tests.support import replication_rig

ROWS = 3000
ROW = 3000


class CuttableProxy:
    """A TCP relay on loopback that can stop forwarding the agent's bytes (its socket buffers
    fill, its send blocks) and then reset both sides, as a path that fails mid-transfer does."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.transports: list[asyncio.WriteTransport] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, gated: bool) -> None:
        with contextlib.suppress(Exception):
            while True:
                if gated:
                    await self.flowing.wait()
                data = await r.read(65536)
                if not data:
                    break
                w.write(data)
                await w.drain()
        w.close()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.transports += [cw.transport, sw.transport]
        await asyncio.gather(self._pipe(cr, sw, False), self._pipe(sr, cw, True))

    def cut(self) -> None:
        for t in self.transports:
            t.abort()  # a reset, both ways
        self.transports.clear()
        self.flowing.set()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def until(condition: Callable[[], object], seconds: float) -> bool:
    return await replication_rig.until(condition, seconds, interval=0.02)


def test_a_connection_cut_mid_stream_is_resumed_without_a_resnapshot(tmp_path: Path) -> None:
    certs = tmp_path / "tls"
    replication_rig.pki(certs)
    db = tmp_path / "src.db"
    app = replication_rig.blob_db(db, ROWS, ROW)

    async def scenario() -> None:
        agent = replication_rig.sqlite_agent(db, certs, heartbeat_s=0.2, poll_interval_s=0.005)
        await agent.start()
        proxy = CuttableProxy(agent.port)
        port = await proxy.start()
        replica = Replica(tmp_path / "rep.db", durable=False)
        replica.open()

        def client() -> SqliteStreamClient:
            return replication_rig.sqlite_client(
                "db",
                replica,
                port,
                certs,
                compression="none",  # these pages would compress to almost nothing: fill the buffers
            )

        first = client()
        task = asyncio.create_task(first.run())
        try:
            assert await until(lambda: replica.checksum == logical_checksum(db), 60), "never seeded"
            (follower,) = agent.followers
            # The path stops carrying the agent's bytes while it sends a large transaction (every
            # row rewritten: ~9 MB, in chunks), then resets both ways while the agent's send waits.
            proxy.flowing.clear()
            await asyncio.to_thread(app.execute, "UPDATE customers SET note = zeroblob(3000) || note")
            assert await until(lambda: agent.chunked_batches == 0 and follower.frames_shipped > ROWS, 30)
            await asyncio.sleep(0.5)  # its socket buffers full, the agent waits in its send
            proxy.cut()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # the backup stays away meanwhile
            assert await until(lambda: not agent.followers, 10), "the session did not end"
            assert await until(lambda: "db" in agent.standing, 2), (
                "the follower was closed, not kept standing"
            )

            # While the backup is away the application commits and truncates its WAL (in a thread:
            # the standing follower, in this event loop, must make way for the TRUNCATE meanwhile).
            def truncate() -> int:
                app.execute("INSERT INTO customers (note) VALUES (?)", (b"after the cut" * 100,))
                busy = app.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                app.execute("INSERT INTO customers (note) VALUES (?)", (b"new generation" * 100,))
                return int(busy)

            assert await asyncio.to_thread(truncate) == 0, "the TRUNCATE checkpoint did not complete"
            second = client()
            task = asyncio.create_task(second.run())
            want = logical_checksum(db)
            assert await until(lambda: replica.checksum == want and second.stats.batches, 60), "no catch-up"
            print(
                f"second session: mode {second.stats.mode}, {second.stats.pages} pages,"
                f" resnapshots {second.stats.resnapshots}, continuity lost {agent.continuity_lost}"
            )
            assert second.stats.mode == "resume"
            assert first.stats.resnapshots == second.stats.resnapshots == 0
            assert agent.continuity_lost == 0
            assert replica.full_checksum() == want
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            proxy.close()
            await agent.stop()
            replica.close()
            app.close()

    asyncio.run(scenario())
