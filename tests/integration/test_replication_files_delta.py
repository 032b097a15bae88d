"""Large config files travel as block deltas against the replica's version: in-place edits and
appends cost their changed blocks, not the file; a rewrite goes whole; the result is always exact."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from appliance.replication.files import (
    BLOCK,
    FilesReplica,
    FilesStreamClient,
    apply_delta,
    block_digests,
    changed_blocks,
)
from appliance.replication.protocol import ProtocolError
from appliance.replication.source import ServedStream, SourceAgent
from tests.support import replication_rig

SIZE = 4_000_000


def test_delta_rebuilds_exactly_for_edits_appends_and_truncations() -> None:
    old = os.urandom(SIZE)
    cases = {
        "edit": old[:1_500_000] + b"X" * 10 + old[1_500_010:],
        "append": old + os.urandom(100_000),
        "truncate": old[:2_000_123],
        "last byte": old[:-1] + bytes([old[-1] ^ 1]),
    }
    for name, new in cases.items():
        indices = changed_blocks(block_digests(new), block_digests(old))
        body = b"".join(new[i * BLOCK : (i + 1) * BLOCK] for i in indices)
        assert apply_delta(old, len(new), BLOCK, indices, body) == new, name
        assert len(body) <= 2 * BLOCK + 100_000, name
    with pytest.raises(ProtocolError):
        apply_delta(old, SIZE, BLOCK, [0], b"short")


def test_large_file_changes_travel_as_deltas(tmp_path: Path) -> None:
    certs = tmp_path / "tls"
    replication_rig.pki(certs)
    src, dst = tmp_path / "prompts", tmp_path / "replica" / "prompts"
    src.mkdir()
    big = src / "routing.db"
    big.write_bytes(os.urandom(SIZE))  # incompressible: bytes on the wire are what was sent

    async def equal(timeout: float = 10) -> bool:
        for _ in range(int(timeout / 0.05)):
            if (dst / "routing.db").exists() and (dst / "routing.db").read_bytes() == big.read_bytes():
                return True
            await asyncio.sleep(0.05)
        return False

    def start(agent: SourceAgent) -> tuple[FilesStreamClient, asyncio.Task[None]]:
        client = FilesStreamClient(
            "prompts",
            "prompts",
            FilesReplica(dst),
            host="127.0.0.1",
            port=agent.port,
            server_name="source",
            ssl_context=replication_rig.client_ctx(certs),
        )
        return client, asyncio.create_task(client.run())

    async def scenario() -> None:
        agent = SourceAgent(
            [ServedStream("prompts", "files", src)],
            heartbeat_s=0.2,
            ssl_context=replication_rig.server_ctx(certs),
        )
        await agent.start()
        client, task = start(agent)
        assert await equal()
        assert client.deltas == 0 and client.stats.bytes_received > SIZE  # first copy: whole

        def edit(data: bytes) -> None:
            tmp = src / ".routing.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, big)

        # In place, in this session: the agent remembers what it sent.
        before = client.stats.bytes_received
        data = big.read_bytes()
        edit(data[:2_000_000] + b"changed!" + data[2_000_008:])
        assert await equal()
        assert client.deltas == 1 and client.stats.bytes_received - before < 3 * BLOCK

        # A new session: the replica lists its block hashes; an append costs the appended bytes.
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        edit(big.read_bytes() + os.urandom(50_000))
        client, task = start(agent)
        assert await equal()
        assert client.deltas == 1 and client.stats.bytes_received < 4 * BLOCK

        # Rewritten throughout: the delta would not pay, the file goes whole.
        before = client.stats.bytes_received
        edit(os.urandom(SIZE))
        assert await equal()
        assert client.deltas == 1 and client.stats.bytes_received - before > SIZE
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await agent.stop()

    asyncio.run(scenario())
